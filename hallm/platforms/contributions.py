"""Collecting what plugins contribute through the hooks: backends, executors, connectors, models.

Answers come from every registered plugin: the extensions (loaded here on first use) and the
device plugin(s) loaded in this process. Each plugin is asked on its own so that a bad answer
or an exception names the plugin, and two plugins contributing one name is an error naming
both: a contribution never silently shadows another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from hallm.platforms.attention import AttentionBackend
from hallm.platforms.discovery import PLATFORM_GROUP
from hallm.platforms.errors import PluginConflictError, PluginLoadError
from hallm.platforms.executor import Executor
from hallm.platforms.kv_connector import KVConnector
from hallm.platforms.loading import load_extensions, plugin_manager, plugin_origin
from hallm.platforms.platform import Platform


def _answers(hook_name: str, only: str | None = None, **kwargs: Any) -> list[tuple[str, object]]:
    """(plugin name, answer) of every implementation (or of plugin `only`).

    Device plugins answer first, then extensions, each by name: the order of contributed
    backends must not depend on installation order.
    """
    load_extensions()
    hook = getattr(plugin_manager().hook, hook_name)
    impls = sorted(
        hook.get_hookimpls(), key=lambda i: (not i.plugin_name.startswith(PLATFORM_GROUP), i.plugin_name)
    )
    answers: list[tuple[str, object]] = []
    for impl in impls:
        if (only is not None and impl.plugin_name != only) or impl.wrapper or impl.hookwrapper:
            continue  # wrappers have nothing to contribute; they only make sense around a hook call
        try:
            answer = impl.function(*(kwargs[arg] for arg in impl.argnames))
        except Exception as exc:
            raise PluginLoadError(
                f"{plugin_origin(impl.plugin_name)}: {hook_name}() raised {type(exc).__name__}: {exc}"
            ) from exc
        if answer is not None:
            answers.append((impl.plugin_name, answer))
    return answers


def _merge(hook_name: str, base: type, what: str, only: str | None = None) -> dict[str, type]:
    merged: dict[str, type] = {}
    owner: dict[str, str] = {}
    for plugin_name, answer in _answers(hook_name, only):
        if not isinstance(answer, Mapping):
            raise PluginLoadError(
                f"{plugin_origin(plugin_name)}: {hook_name}() must return a mapping of name to class"
            )
        for key, cls in answer.items():
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginLoadError(
                    f"{plugin_origin(plugin_name)}: {hook_name}() gave {what} '{key}' = {cls!r}, "
                    f"not a {base.__module__}.{base.__qualname__} subclass"
                )
            if key in merged:
                raise PluginConflictError(
                    f"{what} '{key}' is contributed by both {plugin_origin(owner[key])} and "
                    f"{plugin_origin(plugin_name)}; uninstall one of them"
                )
            merged[key], owner[key] = cls, plugin_name
    return merged


def contributed_attention_backends(platform: Platform) -> list[type[AttentionBackend]]:
    """Attention backends that plugins contribute to `platform`, in a deterministic order.

    Does not include the platform's own `attention_backends()`; see `attention_candidates`.
    """
    backends: list[type[AttentionBackend]] = []
    for plugin_name, answer in _answers("hallm_attention_backends", platform=platform):
        if not isinstance(answer, Sequence):
            raise PluginLoadError(
                f"{plugin_origin(plugin_name)}: hallm_attention_backends() must return a sequence of classes"
            )
        for cls in answer:
            if not (isinstance(cls, type) and issubclass(cls, AttentionBackend)):
                raise PluginLoadError(
                    f"{plugin_origin(plugin_name)}: hallm_attention_backends() gave {cls!r}, "
                    "not a hallm.platforms.AttentionBackend subclass"
                )
            backends.append(cls)
    return backends


def attention_candidates(platform: Platform) -> list[type[AttentionBackend]]:
    """The platform's own attention backends (its order), then contributed ones.

    Raises `PluginConflictError` when two candidates share a name, naming both classes.
    """
    candidates = [*platform.attention_backends(), *contributed_attention_backends(platform)]
    seen: dict[str, type[AttentionBackend]] = {}
    for cls in candidates:
        name = getattr(cls, "name", None)
        if not isinstance(name, str):
            raise PluginLoadError(f"attention backend {cls.__module__}.{cls.__qualname__} has no `name`")
        other = seen.setdefault(name, cls)
        if other is not cls:
            raise PluginConflictError(
                f"two attention backends for device '{platform.name}' are named '{name}': "
                f"{other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}; "
                "uninstall the extension that contributes one of them"
            )
    return list(seen.values())


def executors() -> dict[str, type[Executor]]:
    """Executors contributed by plugins (`hallm_executors`), by name."""
    return cast("dict[str, type[Executor]]", _merge("hallm_executors", Executor, "executor"))


def kv_connectors() -> dict[str, type[KVConnector]]:
    """KV connectors contributed by plugins (`hallm_kv_connectors`), by name."""
    return cast("dict[str, type[KVConnector]]", _merge("hallm_kv_connectors", KVConnector, "KV connector"))


def models() -> dict[str, type[object]]:
    """Model classes contributed by plugins (`hallm_models`), by HF architecture name."""
    return _merge("hallm_models", object, "model")


def contributed_names(plugin_name: str) -> list[str]:
    """What one registered plugin contributes, as "executor:NAME", "kv_connector:NAME" and
    "model:NAME" (attention backends depend on the platform; see `attention_candidates`)."""
    names = [f"executor:{n}" for n in _merge("hallm_executors", Executor, "executor", plugin_name)]
    names += [
        f"kv_connector:{n}" for n in _merge("hallm_kv_connectors", KVConnector, "KV connector", plugin_name)
    ]
    names += [f"model:{n}" for n in _merge("hallm_models", object, "model", plugin_name)]
    return names
