"""`NeuronPlatform`: AWS Trainium and Inferentia2 NeuronCores through torch-neuronx, whose
devices are torch-xla devices ("xla").

Written against the Neuron SDK's documented API (torch-neuronx over torch-xla); the SDK is not
on PyPI (its names there are placeholders that refuse to import), so this plugin has not run.

The Neuron compiler compiles one program per distinct tensor shape, and each compile takes
minutes: `update_config` rounds the shapes the engine steps with to a small set of static
buckets (`ShapeBuckets`), and the attention is the pure-torch reference, whose gathers XLA
compiles like any other op.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from hallm.platforms import API_VERSION, Capabilities, Platform, Probe

if TYPE_CHECKING:
    import torch

    from hallm.platforms import AttentionBackend

DEVICE_GLOB = "/dev/neuron*"
#: Smallest token bucket: shorter steps pad up to it.
MIN_TOKEN_BUCKET = 128


def neuron_devices() -> list[str]:
    """The Neuron driver's device nodes (/dev/neuron0, ...), without opening them."""
    return sorted(glob.glob(DEVICE_GLOB))


def runtime_installed() -> bool:
    return importlib.util.find_spec("torch_neuronx") is not None


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ShapeBuckets:
    """The static shapes a Neuron engine compiles: tokens per step and requests per step, each a
    power of two up to the (rounded) scheduler limit."""

    tokens: tuple[int, ...]
    seqs: tuple[int, ...]

    @classmethod
    def for_limits(cls, max_tokens: int, max_seqs: int) -> ShapeBuckets:
        def powers(lo: int, hi: int) -> tuple[int, ...]:
            out, b = [], lo
            while b < hi:
                out.append(b)
                b *= 2
            return (*out, hi)

        return cls(tokens=powers(MIN_TOKEN_BUCKET, max_tokens), seqs=powers(1, max_seqs))


class NeuronPlatform(Platform):
    """NeuronCores: bf16, fp32; reference attention on the XLA device; static shape buckets."""

    name: ClassVar[str] = "neuron"
    device_type: ClassVar[str] = "xla"
    dist_backend: ClassVar[str] = "xla"
    visible_devices_env: ClassVar[str | None] = "NEURON_RT_VISIBLE_CORES"
    ray_resource: ClassVar[str | None] = "neuron_cores"
    auto_priority: ClassVar[int] = 70
    api_version: ClassVar[str] = API_VERSION

    def __init__(self) -> None:
        self.buckets: ShapeBuckets | None = None

    @classmethod
    def probe(cls) -> Probe:
        """Available when the Neuron driver shows devices and torch-neuronx imports."""
        try:
            devices = neuron_devices()
            if not devices:
                runtime = "" if runtime_installed() else "; torch-neuronx is not installed either"
                return Probe(False, f"no Neuron device ({DEVICE_GLOB} not found){runtime}")
            if not runtime_installed():
                return Probe(
                    False,
                    f"{len(devices)} Neuron device(s), but torch-neuronx is not installed "
                    "(from the Neuron repository, pip.repos.neuron.amazonaws.com)",
                )
            try:
                import torch_neuronx  # noqa: F401  (PyPI's placeholder raises ImportError here)
            except ImportError as exc:
                return Probe(False, f"torch-neuronx does not import: {exc}")
            return Probe(True, f"{len(devices)} Neuron device(s)", device_count=len(devices))
        except Exception as exc:  # a probe never raises
            return Probe(False, f"Neuron probe failed: {type(exc).__name__}: {exc}")

    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=("bfloat16", "float32"),
            kv_cache_dtypes=("auto",),
            graph_capture=False,
            max_world_size=max(1, len(neuron_devices())),
            torch_compile=False,
        )

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        from hallm.ops.reference_backend import ReferenceAttention

        return [ReferenceAttention]

    def update_config(self, config: Any) -> None:
        """Round the scheduler's limits to static buckets (powers of two, max_model_len to whole
        blocks) so the compiler sees a bounded set of shapes; declare them in `self.buckets`."""
        sched, cache, model = config.scheduler, config.cache, config.model
        sched.max_num_batched_tokens = _next_power_of_two(max(MIN_TOKEN_BUCKET, sched.max_num_batched_tokens))
        sched.max_num_seqs = _next_power_of_two(sched.max_num_seqs)
        sched.async_scheduling = False  # one step in flight: each step's shapes are settled first
        model.max_model_len = -(-model.max_model_len // cache.block_size) * cache.block_size
        self.buckets = ShapeBuckets.for_limits(sched.max_num_batched_tokens, sched.max_num_seqs)

    # ---- device runtime (torch-xla, as torch-neuronx uses it) -------------------------------

    def device(self, index: int = 0) -> torch.device:
        import torch_xla.core.xla_model as xm

        return xm.xla_device(index)

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.mark_step()
        xm.wait_device_ops()

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(self.device(device_index))
        total = int(info["bytes_limit"])
        return total - int(info["bytes_used"]), total

    def manual_seed(self, seed: int) -> None:
        import torch
        import torch_xla.core.xla_model as xm

        torch.manual_seed(seed)
        xm.set_rng_state(seed)
