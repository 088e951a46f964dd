"""`TpuPlatform`: Google TPUs as a hallm device, run through JAX.

The probe never initializes a JAX backend (that would claim the TPU in the parent process and
takes seconds): it looks for JAX's TPU runtime (libtpu) and for TPU device files. `JAX_PLATFORMS=cpu`,
JAX's own switch, asks for JAX's CPU backend instead; the plugin then runs its JAX worker on the
host, for testing, and ranks below every real device under `--device auto`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import psutil  # type: ignore[import-untyped]

from hallm.platforms import API_VERSION, Capabilities, ConfigError, Platform, Probe

if TYPE_CHECKING:
    from hallm.platforms import AttentionBackend

#: The architectures the JAX worker implements (HF `model_type`).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Auto priority on a TPU host: above the CPU (0), below CUDA (100).
TPU_AUTO_PRIORITY = 90
#: Auto priority in the JAX CPU-backend mode: below the CPU plugin, so `--device auto` never
#: prefers a test mode to the real host device.
JAX_CPU_AUTO_PRIORITY = -10


def jax_cpu_requested(env: Mapping[str, str] = os.environ) -> bool:
    """True when `JAX_PLATFORMS` makes JAX's CPU backend the default ("cpu", or "cpu,...")."""
    names = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    return bool(names) and names[0] == "cpu"


def tpu_device_files() -> list[str]:
    """TPU chips as the kernel shows them: /dev/accel* (v2-v5e) or VFIO groups (v5p, v6e)."""
    accel = sorted(glob.glob("/dev/accel*"))
    if accel:
        return accel
    return sorted(p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit())


def visible_chips(env: Mapping[str, str] = os.environ) -> list[int] | None:
    """The chip ids `TPU_VISIBLE_CHIPS` restricts this process to, None when it is unset (set
    but empty: every chip is hidden).

    Raises ValueError for a value that is not a comma-separated list of chip ids."""
    raw = env.get("TPU_VISIBLE_CHIPS")
    if raw is None:
        return None
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"TPU_VISIBLE_CHIPS={raw!r} is not a comma-separated list of chip ids") from None


class TpuPlatform(Platform):
    """TPUs through JAX: bfloat16 (default) and float32 models on a JAX worker."""

    name: ClassVar[str] = "tpu"
    # The torch tensors this plugin makes (the sampler's logits) live on the host; the model,
    # its weights and the KV cache are JAX arrays on the TPU.
    device_type: ClassVar[str] = "cpu"
    dist_backend: ClassVar[str] = "gloo"
    visible_devices_env: ClassVar[str | None] = "TPU_VISIBLE_CHIPS"
    ray_resource: ClassVar[str | None] = "TPU"
    # Read once, when the class is defined (the plugin is imported at selection time).
    auto_priority: ClassVar[int] = JAX_CPU_AUTO_PRIORITY if jax_cpu_requested() else TPU_AUTO_PRIORITY
    api_version: ClassVar[str] = API_VERSION

    @classmethod
    def probe(cls) -> Probe:
        """Available with libtpu and TPU device files, or in the JAX CPU-backend mode; never
        imports jax (finding its modules is enough)."""
        try:
            return _probe(os.environ)
        except Exception as exc:  # a probe never raises
            return Probe(False, f"TPU probe failed: {type(exc).__name__}: {exc}")

    def capabilities(self) -> Capabilities:
        """bfloat16 first (the TPU's native matmul type), then float32."""
        return Capabilities(
            dtypes=("bfloat16", "float32"),
            kv_cache_dtypes=("auto",),
            graph_capture=False,  # jit compiles every step shape at start-up instead
            max_world_size=1,
            torch_compile=False,
            # The worker runs each step to the end (sampling on the host): no execute_async.
            async_scheduling=False,
        )

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        """The JAX worker's kernels, by the names `--attention-backend` takes (the worker runs
        them on device arrays; `hallm_tpu.backends` puts them behind the torch contract)."""
        from hallm_tpu.backends import JaxPagedAttention, PallasPagedAttention

        return [JaxPagedAttention, PallasPagedAttention]

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """(free, total) bytes of the TPU's HBM from JAX's memory statistics; JAX's CPU backend
        keeps none, and there the host's memory is the device's."""
        import jax

        stats = jax.local_devices()[device_index].memory_stats()
        if stats and stats.get("bytes_limit"):
            total = int(stats["bytes_limit"])
            return max(0, total - int(stats.get("bytes_in_use", 0))), total
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    def device_name(self, index: int = 0) -> str:
        """The chip kind JAX reports (e.g. "TPU v5 lite"), or the CPU-backend mode's name."""
        import jax

        device = jax.local_devices()[index]
        if device.platform == "cpu":
            return "JAX CPU backend (for testing; not a TPU)"
        return str(device.device_kind)

    def update_config(self, config: Any) -> None:
        """Refuse what the JAX worker does not run, before any weight is read."""
        from hallm_tpu.attention import ATTENTION_IMPLS

        model_type = getattr(config.model.hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"the tpu device runs the Llama family only ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"this model is {model_type!r}: use --device cpu or cuda for it"
            )
        if config.cache.kv_cache_dtype != "auto":
            raise ConfigError(
                f"the tpu device keeps the KV cache in the model dtype; kv_cache_dtype "
                f"{config.cache.kv_cache_dtype!r} is not supported (use 'auto')"
            )
        if config.attention_backend is not None and config.attention_backend not in ATTENTION_IMPLS:
            raise ConfigError(
                f"the tpu device has no attention backend {config.attention_backend!r}; "
                f"choose one of {sorted(ATTENTION_IMPLS)}"
            )

    def worker_class(self) -> type | None:
        """The JAX worker: the core's scheduler output in, the core's ModelRunnerOutput out."""
        from hallm_tpu.worker import TpuWorker

        return TpuWorker


def _probe(env: Mapping[str, str]) -> Probe:
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("jaxlib") is None:
        return Probe(False, "JAX is not installed: pip install 'hallm[tpu]'")
    try:
        chips = visible_chips(env)
    except ValueError as exc:
        return Probe(False, str(exc))
    if chips == []:
        return Probe(False, "TPU_VISIBLE_CHIPS is set but empty: every TPU chip is hidden from this process")
    if jax_cpu_requested(env):
        return Probe(
            True,
            "available: JAX CPU backend, for testing (JAX_PLATFORMS=cpu); no TPU is used",
            device_count=1,
        )
    if importlib.util.find_spec("libtpu") is None:
        return Probe(
            False,
            "libtpu (JAX's TPU runtime) is not installed: on a TPU VM run pip install 'jax[tpu]'; "
            "to test the JAX worker on this host's CPU, set JAX_PLATFORMS=cpu",
        )
    files = tpu_device_files()
    if not files:
        return Probe(
            False,
            "no TPU device is visible (no /dev/accel* or /dev/vfio/<group>): this is not a TPU VM, "
            "or the container was started without the TPU devices",
        )
    if chips is not None:
        missing = [c for c in chips if c >= len(files)]
        if missing:
            return Probe(False, f"TPU_VISIBLE_CHIPS names chips {missing}, but {len(files)} are present")
        return Probe(True, f"{len(chips)} of {len(files)} TPU chips (TPU_VISIBLE_CHIPS)", len(chips))
    return Probe(True, f"{len(files)} TPU chip(s) ({', '.join(files)}); libtpu found", len(files))
