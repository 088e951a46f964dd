"""The Platform contract: one implementation per device type.

A platform plugin returns its Platform subclass from the `hallm_platform` hook. The class
carries the device's identity as data, a cheap `probe()` that never raises, its capabilities,
its attention backends in order of preference, and the device runtime the engine needs.
Everything else has a documented default, so a minimal plugin overrides only what differs.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from hallm.platforms.attention import AttentionBackend
    from hallm.platforms.graphs import StepGraphRunner, StepGraphTarget
    from hallm.platforms.ops import OpTable

#: Model/activation dtypes by the names used in configs and on the command line.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Probe:
    """What `Platform.probe()` found.

    available: the device can run a model in this process.
    reason: why it is (or is not) available, in words a user can act on.
    device_count: how many devices of this type are visible.
    """

    available: bool
    reason: str
    device_count: int = 0


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a platform can do, as data (never a list of boolean methods).

    dtypes: model dtypes by name ("float32", "bfloat16", "float16"); the first is the default
        when the user asks for `--dtype auto` and the checkpoint's dtype is not supported.
    kv_cache_dtypes: KV-cache dtypes beyond "auto" (which means: the model dtype).
    graph_capture: the platform can capture and replay decode steps (`step_graphs`).
    max_world_size: the most ranks for tensor parallelism (None: no limit known; 1: none).
    torch_compile: `compile_model` does something useful on this device.
    async_scheduling: overlap scheduling the next step with the device running this one (the
        default of `--async-scheduling`). Worth it where steps run asynchronously to the host
        (an accelerator); on a host device the step is the host's own work.
    pinned_host_memory: the device copies page-locked host memory faster (the host-memory KV
        offload connector then pins its pool).
    """

    dtypes: tuple[str, ...]
    kv_cache_dtypes: tuple[str, ...] = ("auto",)
    graph_capture: bool = False
    max_world_size: int | None = 1
    torch_compile: bool = False
    async_scheduling: bool = True
    pinned_host_memory: bool = False

    def __post_init__(self) -> None:
        if not self.dtypes:
            raise ValueError("Capabilities.dtypes must name at least one dtype")
        unknown = [d for d in self.dtypes if d not in DTYPE_NAMES]
        if unknown:
            raise ValueError(f"Capabilities.dtypes has unknown names {unknown}; use {DTYPE_NAMES}")


class Platform(ABC):
    """A device type (cuda, rocm, tpu, cpu, neuron, xpu, or a vendor's own).

    Identity is class data. `probe()` is a classmethod so it runs before any instance exists;
    the engine then makes exactly one instance per process. Required: `probe`,
    `capabilities`, `attention_backends`, `memory_info`. Everything else has a default.
    """

    #: Device id; equals the entry-point name in group `hallm.platforms`.
    name: ClassVar[str]
    #: torch device type used for tensors ("cuda", "cpu", "xpu", "xla", ...).
    device_type: ClassVar[str]
    #: torch.distributed backend for tensor parallelism ("nccl", "gloo", "xccl", ...).
    dist_backend: ClassVar[str] = "gloo"
    #: Environment variable that restricts visible devices (e.g. CUDA_VISIBLE_DEVICES).
    visible_devices_env: ClassVar[str | None] = None
    #: Ray resource name of one device (e.g. "GPU"), None when Ray cannot schedule it.
    ray_resource: ClassVar[str | None] = None
    #: Higher wins under `--device auto` among available platforms.
    auto_priority: ClassVar[int] = 0
    #: The plugin API version this platform was written against ("MAJOR.MINOR").
    api_version: ClassVar[str]

    _REQUIRED_CLASS_ATTRS: ClassVar[tuple[str, ...]] = ("name", "device_type", "api_version")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return  # an intermediate abstract base; checked on its concrete subclasses
        missing = [a for a in cls._REQUIRED_CLASS_ATTRS if not isinstance(getattr(cls, a, None), str)]
        if missing:
            raise TypeError(f"Platform subclass {cls.__qualname__} must set class attributes {missing}")

    # ---- required --------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def probe(cls) -> Probe:
        """Say whether the device is usable here. Cheap, side-effect free, never raises.

        Must not initialize a device runtime needlessly (the registry runs every probe in the
        parent process under `--device auto`) and must return within a second or two.
        """

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """The platform's capabilities (see `Capabilities`)."""

    @abstractmethod
    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        """This platform's attention backends, most preferred first.

        The core selects among these plus those contributed through the
        `hallm_attention_backends` hook: the user's `--attention-backend` if given, else the
        first whose `validate()` returns no reasons.
        """

    @abstractmethod
    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """(free_bytes, total_bytes) of the device memory that can hold weights and KV cache."""

    # ---- device runtime, with defaults ------------------------------------------------------

    def device(self, index: int = 0) -> torch.device:
        """The torch device for local device `index`. Default: `torch.device(device_type, index)`."""
        import torch

        return torch.device(self.device_type, index)

    def device_name(self, index: int = 0) -> str:
        """A human-readable name of the device, for logs and reports. Default: the device id."""
        return self.name

    def set_device(self, index: int) -> None:
        """Bind the calling process/thread to local device `index`. Default: nothing."""

    def synchronize(self) -> None:
        """Wait for all queued device work. Default: nothing (a synchronous device)."""

    def empty_cache(self) -> None:
        """Return cached, unused device memory to the system. Default: nothing."""

    def manual_seed(self, seed: int) -> None:
        """Seed every random generator the device uses. Default: `torch.manual_seed`."""
        import torch

        torch.manual_seed(seed)

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory allocated since the last `reset_peak_memory()`, if measurable.

        Default: None (the engine then sizes the KV cache from `memory_info()` alone, without
        running a worst-case step to profile).
        """
        return None

    def allocated_memory_bytes(self) -> int | None:
        """Device memory held by live tensors of this process now, if measurable (the baseline
        `peak_memory_bytes()` is compared with). Default: None."""
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory measurement. Default: nothing."""

    def warm_up_at_start(self) -> bool:
        """Whether the engine runs dummy requests through every kind of step (a full prefill
        chunk, short prefills, decode, the sampler's paths) before serving, so that kernels
        compiled on first use are built before the first user request (`hallm.core.warmup`).
        Default: False (kernels built ahead of time; nothing to compile).
        """
        return False

    def default_max_num_batched_tokens(self, max_model_len: int) -> int:
        """The step budget (`max_num_batched_tokens`) when the user sets none. Each step pays a
        fixed host cost (prompt steps run eagerly: a launch per op per layer), so a device whose
        eager launches are slow wants fewer, larger steps; a device that computes on the host (a
        CPU) gains nothing from them and holds larger activations. Default: `max_model_len`,
        kept within [2048, 8192].
        """
        return max(2048, min(max_model_len, 8192))

    def default_kv_cache_bytes(self) -> int | None:
        """The KV pool's cap in bytes when the user sets none (`kv_cache_memory_bytes`), or None
        to fill the memory left under `gpu_memory_utilization`. A device whose memory is shared
        with the rest of the system (host RAM) returns a fixed size. Default: None.
        """
        return None

    # ---- engine hooks, with defaults --------------------------------------------------------

    def update_config(self, config: Any) -> None:
        """Validate and adjust the engine config for this device, in place.

        Raise `ConfigError` with an actionable message for what the device cannot do; never
        assert. The core has already checked the dtype against `capabilities()`.
        Default: nothing.
        """

    def op_table(self) -> OpTable:
        """This device's kernels for the ops inside hallm's native layers (`hallm.platforms.ops`).

        The model's layers are built with this table and call it; an entry left None runs the
        reference in `hallm.ops.reference_ops`. Default: an empty table (every op the reference).
        """
        from hallm.platforms.ops import OpTable

        return OpTable()

    def compile_model(self, model: Any, config: Any) -> Any:
        """Return the model to run, compiled (e.g. `torch.compile`). Default: unchanged.

        The model is built; a device's kernels reach its layers through `op_table()`, never by
        replacing modules here.
        """
        return model

    def step_graphs(self, target: StepGraphTarget) -> StepGraphRunner | None:
        """Capture decode steps of `target` (the model runner: its persistent input buffers and
        its forward, `hallm.platforms.graphs`) and return the runner that replays them, or None
        to run eagerly. Called once, after the KV cache is allocated, when the platform declares
        `Capabilities.graph_capture` and the user did not ask for `--enforce-eager`. A capture
        that fails raises an error that names the cause. Default: None.
        """
        return None

    def worker_class(self) -> type | None:
        """A worker class replacing the core's `hallm.core.worker.Worker` (e.g. a JAX worker).

        It is built as `cls(config, platform)` and must have the core worker's methods:
        `init_device()`, `load_model()`, `available_kv_cache_bytes()`, `bytes_per_block()`,
        `init_kv_cache(num_blocks)` and `execute(step) -> ModelRunnerOutput`; `execute_async(step)`
        (a handle whose `get()` gives the output) is optional and turns on async scheduling;
        `shutdown()` is optional and is called when the engine stops (release threads, sockets).
        Default: None (the core's worker).
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Identity as plain data, for `hallm plugins` and reports."""
        return {
            "name": self.name,
            "device_type": self.device_type,
            "dist_backend": self.dist_backend,
            "visible_devices_env": self.visible_devices_env,
            "ray_resource": self.ray_resource,
            "auto_priority": self.auto_priority,
            "api_version": self.api_version,
        }
