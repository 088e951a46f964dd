"""hallm's public plugin API: everything a device plugin or extension may import.

A plugin imports from `hallm.platforms` (the contracts) and `hallm.ops` (portable reference and
Triton kernels), nothing else of the core. Importing this module imports no torch and no
device runtime.
"""

from __future__ import annotations

from hallm.platforms.attention import (
    FEATURE_SINKS,
    FEATURE_SLIDING_WINDOW,
    FEATURE_SOFT_CAP,
    KNOWN_FEATURES,
    AttentionBackend,
    AttentionSpec,
    BatchLayout,
    LayoutTensors,
)
from hallm.platforms.env import SETTINGS, env_flag
from hallm.platforms.errors import (
    BackendSelectionError,
    ConfigError,
    DeviceSelectionError,
    HallmError,
    PluginAPIVersionError,
    PluginConflictError,
    PluginLoadError,
)
from hallm.platforms.executor import Executor
from hallm.platforms.forward_context import ForwardContext, get_forward_context, set_forward_context
from hallm.platforms.graphs import StepGraphRunner, StepGraphTarget, StepInputBuffers
from hallm.platforms.hookspecs import HallmHookSpecs, hookimpl, hookspec
from hallm.platforms.kv_connector import KVConnector, KVConnectorRole
from hallm.platforms.ops import (
    OP_NAMES,
    SILU_GLU,
    BoundLinear,
    ClampedSwiGLU,
    DecoderLayerWeights,
    DecoderStackKernel,
    DecoderStackWeights,
    FusedMoEOp,
    LinearKernel,
    LinearWeights,
    MoEActivation,
    OpTable,
    PagedAttentionLayer,
    SiluGLU,
    TemperatureSampleOp,
)
from hallm.platforms.paths import cache_root
from hallm.platforms.platform import DTYPE_NAMES, Capabilities, Platform, Probe

#: The plugin API version ("MAJOR.MINOR"). A plugin whose `Platform.api_version` has another
#: major version is refused at load; a newer minor version than the core's gets a warning.
API_VERSION = "1.7"

__all__ = [
    "API_VERSION",
    "OP_NAMES",
    "SILU_GLU",
    "BoundLinear",
    "ClampedSwiGLU",
    "FusedMoEOp",
    "MoEActivation",
    "SiluGLU",
    "TemperatureSampleOp",
    "DecoderLayerWeights",
    "DecoderStackKernel",
    "DecoderStackWeights",
    "LinearKernel",
    "LinearWeights",
    "OpTable",
    "PagedAttentionLayer",
    "StepGraphRunner",
    "StepGraphTarget",
    "StepInputBuffers",
    "DTYPE_NAMES",
    "FEATURE_SLIDING_WINDOW",
    "FEATURE_SINKS",
    "FEATURE_SOFT_CAP",
    "KNOWN_FEATURES",
    "AttentionBackend",
    "AttentionSpec",
    "BackendSelectionError",
    "BatchLayout",
    "Capabilities",
    "ConfigError",
    "DeviceSelectionError",
    "Executor",
    "ForwardContext",
    "HallmError",
    "HallmHookSpecs",
    "KVConnector",
    "KVConnectorRole",
    "LayoutTensors",
    "Platform",
    "PluginAPIVersionError",
    "PluginConflictError",
    "PluginLoadError",
    "Probe",
    "cache_root",
    "env_flag",
    "SETTINGS",
    "get_forward_context",
    "hookimpl",
    "hookspec",
    "set_forward_context",
]
