"""pluggy hook specifications (project name "hallm").

A platform plugin (entry-point group `hallm.platforms`, entry-point name = device id) implements
`hallm_platform`. Extensions (group `hallm.plugins`) implement any of the contribution hooks.
Implement hooks with `hallm.platforms.hookimpl`; a misspelled hook name fails at load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hallm.platforms.attention import AttentionBackend
    from hallm.platforms.executor import Executor
    from hallm.platforms.kv_connector import KVConnector
    from hallm.platforms.platform import Platform

PROJECT_NAME = "hallm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class HallmHookSpecs:
    """The hooks a plugin may implement."""

    @hookspec(firstresult=True)
    def hallm_platform(self) -> type[Platform]:  # type: ignore[empty-body]
        """Return this plugin's Platform subclass. Must be cheap and import no device runtime."""

    @hookspec
    def hallm_attention_backends(self, platform: Platform) -> Sequence[type[AttentionBackend]]:  # type: ignore[empty-body]
        """Extra attention backends for `platform` (return [] for platforms you do not serve)."""

    @hookspec
    def hallm_executors(self) -> Mapping[str, type[Executor]]:  # type: ignore[empty-body]
        """Extra executors by name (selected with `--distributed-executor-backend NAME`)."""

    @hookspec
    def hallm_kv_connectors(self) -> Mapping[str, type[KVConnector]]:  # type: ignore[empty-body]
        """Extra KV connectors by name (selected with `--kv-connector NAME`)."""

    @hookspec
    def hallm_models(self) -> Mapping[str, type]:  # type: ignore[empty-body]
        """Extra model classes by HF architecture name (e.g. "MyForCausalLM")."""
