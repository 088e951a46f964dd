"""KV connectors shipped with the core, and how `--kv-transfer-config` picks one by name.

Core connectors: `shared_storage` (KV blocks in a directory, shared between instances),
`offload` (KV blocks kept in host memory after the device pool evicts them) and `p2p` (a
prefill instance pushes KV to a decode instance over ZMQ/TCP). Plugins add theirs
through the `hallm_kv_connectors` hook; a plugin's connector may not reuse a core name. Every
connector serves tensor-parallel engines too: each rank runs its own worker side over its shard
of the KV heads, and the engine merges the ranks' results (hallm.core.executors.kv_reports).
"""

from __future__ import annotations

import json
from typing import Any

from hallm.core.config import KV_ROLES, EngineConfig, KVTransferConfig
from hallm.platforms import ConfigError, KVConnector, KVConnectorRole


def core_connectors() -> dict[str, type[KVConnector]]:
    from hallm.core.kv_connectors.offload import OffloadConnector
    from hallm.core.kv_connectors.p2p import P2PConnector
    from hallm.core.kv_connectors.shared_storage import SharedStorageConnector

    return {c.name: c for c in (SharedStorageConnector, OffloadConnector, P2PConnector)}


def available_connectors() -> dict[str, type[KVConnector]]:
    """Core connectors plus those of the loaded plugins, by name."""
    from hallm.platforms.registry import kv_connectors as contributed

    found = dict(contributed())
    for name, cls in core_connectors().items():
        if name in found and found[name] is not cls:
            raise ConfigError(
                f"a plugin contributes a KV connector named {name!r}, which is a core connector's name"
            )
        found[name] = cls
    return found


def parse_kv_transfer_config(value: Any) -> KVTransferConfig | None:
    """`--kv-transfer-config` as a dict or a JSON string -> KVTransferConfig (None: no connector)."""
    if value is None:
        return None
    if isinstance(value, KVTransferConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--kv-transfer-config is not valid JSON ({e}): {value!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"kv_transfer_config must be a dict such as {{'kv_connector': 'shared_storage', 'kv_role': "
            f"'kv_both'}}, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - {"kv_connector", "kv_role", "kv_connector_extra_config"})
    if unknown:
        raise ConfigError(
            f"kv_transfer_config has unknown keys {unknown}; known: kv_connector, kv_role, kv_connector_extra_config"
        )
    name = value.get("kv_connector")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            "kv_transfer_config needs 'kv_connector': the connector's name, e.g. 'shared_storage'"
        )
    role = value.get("kv_role", "kv_both")
    if role not in KV_ROLES:
        raise ConfigError(f"kv_transfer_config 'kv_role' must be one of {list(KV_ROLES)}, got {role!r}")
    extra = value.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"kv_connector_extra_config must be a dict, got {type(extra).__name__}")
    return KVTransferConfig(kv_connector=name, kv_role=role, kv_connector_extra_config=dict(extra))


def check_kv_transfer(config: EngineConfig) -> None:
    """Refuse a connector that does not exist or a setup it cannot serve. (A bad extra config
    fails when the engine builds the scheduler side, with the connector's own message.)"""
    kv = config.kv_transfer
    if kv is None:
        return
    found = available_connectors()
    if kv.kv_connector not in found:
        raise ConfigError(
            f"unknown KV connector {kv.kv_connector!r}; available: {sorted(found)} (plugins add theirs "
            "through hallm_kv_connectors)"
        )


def create_connector(config: EngineConfig, role: KVConnectorRole) -> KVConnector | None:
    """The configured connector's instance for `role`, or None without --kv-transfer-config."""
    kv = config.kv_transfer
    if kv is None:
        return None
    cls = available_connectors()[kv.kv_connector]
    return cls(config, role)
