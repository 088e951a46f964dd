"""A model config as plain attributes, for the processes that only build the model from it.

A native hallm model reads its config's attributes and calls none of its methods, so a
tensor-parallel rank needs the values, not transformers' config class. Unpickling that class
imports transformers' config modules, which import torch's distributed, dynamo and sympy stacks:
seconds of CPU in every rank process before it loads a weight. `plain_config` copies the values
(class attributes, properties and `attribute_map` aliases resolved, nested configs copied the
same way) into a `PlainConfig`, which unpickles without transformers. It returns the config
itself wherever something would still need the class: an architecture without a native model
(the generic path builds transformers' own modules from it; a plugin's model may call methods)
and a rope type other than the default (transformers' rope functions call the config's methods).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import pickle
from collections.abc import Mapping
from typing import Any

from hallm.core.layers.rotary import rope_parameters
from hallm.core.models.registry import NATIVE_MODELS, architecture_of

__all__ = ["PlainConfig", "plain_config", "with_plain_model_config"]


class PlainConfig:
    """A config's attribute values, read as attributes (`config.hidden_size`, `getattr`), and
    its `to_dict()` (what identifies the model to a KV connector)."""

    def __init__(self, values: Mapping[str, Any], as_dict: dict[str, Any]) -> None:
        self.__dict__.update(values)
        self.__dict__["_as_dict"] = as_dict

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__["_as_dict"])

    def __repr__(self) -> str:
        return f"PlainConfig(model_type={self.__dict__.get('model_type')!r}, {len(self.__dict__)} attributes)"


def _is_config(value: Any) -> bool:
    return hasattr(value, "attribute_map") and hasattr(value, "to_dict")


def _in_transformers(owner: Any) -> bool:
    """Whether a class or function is transformers' own (unpickling it imports transformers)."""
    return str(getattr(owner, "__module__", "")).split(".")[0] == "transformers"


def _copy(config: Any) -> PlainConfig | None:
    """The values of `config`, or None if one of them (besides nested configs, copied the same
    way) would import transformers when unpickled."""
    values: dict[str, Any] = {}
    cls = type(config)
    for name in dir(cls):
        if name.startswith("_"):
            continue
        static = inspect.getattr_static(cls, name)
        if isinstance(static, property):
            try:
                value = getattr(config, name)
            except Exception:  # a property that needs what this config lacks: not a value
                continue
            # a view of transformers' over the config (per-layer settings) is no value a model
            # reads; reading it from a PlainConfig raises, it never answers wrong
            if _is_config(value) or not _in_transformers(type(value)):
                values[name] = value
        elif not callable(static) and not isinstance(static, (classmethod, staticmethod)):
            values[name] = static
    values.update(vars(config))
    for alias, target in getattr(config, "attribute_map", {}).items():
        if hasattr(config, target):
            values[alias] = getattr(config, target)
    for name, value in list(values.items()):
        if _is_config(value):
            nested = _copy(value)
            if nested is None:
                return None
            values[name] = nested
    plain = PlainConfig(values, config.to_dict())
    return None if _pickle_needs_transformers(plain) else plain


class _NeedsTransformers(Exception):
    pass


class _TransformersFinder(pickle.Pickler):
    """Pickles to nowhere, raising at the first object whose unpickling imports transformers (an
    instance of one of its classes, or a class or function of it, at any depth)."""

    def reducer_override(self, obj: Any) -> Any:
        if _in_transformers(obj if isinstance(obj, type) or callable(obj) else type(obj)):
            raise _NeedsTransformers
        return NotImplemented


def _pickle_needs_transformers(value: Any) -> bool:
    try:
        _TransformersFinder(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except _NeedsTransformers:
        return True
    return False


def plain_config(hf_config: Any, extra_models: Mapping[str, type] | None = None) -> Any:
    """A `PlainConfig` of `hf_config` for a rank process, or `hf_config` itself where the model
    or its rotary embedding needs transformers' class (see the module's docstring).

    extra_models: the plugins' architectures (their models are built from the config as given)."""
    if isinstance(hf_config, PlainConfig) or not _is_config(hf_config):
        return hf_config
    try:
        arch = architecture_of(hf_config)
    except Exception:  # the worker raises the same error, with the real config
        return hf_config
    if arch not in NATIVE_MODELS or arch in (extra_models or {}):
        return hf_config
    if rope_parameters(hf_config)["rope_type"] != "default":
        return hf_config
    return _copy(hf_config) or hf_config


def with_plain_model_config(config: Any) -> Any:
    """An engine config for a process that builds the model from it (a rank, the server's engine
    process): `config` with its model config as `plain_config` makes it."""
    from hallm.platforms.registry import models as contributed_models

    model = config.model
    plain = plain_config(model.hf_config, contributed_models())
    if plain is model.hf_config:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(model, hf_config=plain))
