"""`TemplatePlatform`: the Platform contract, implemented on the host CPU.

Replace each method's body with your device's runtime calls; the docstrings say what the engine
expects. Import your runtime inside methods, not at the top of the module: `probe()` runs in the
parent process for every installed plugin and must stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import psutil  # type: ignore[import-untyped]

from hallm.platforms import Capabilities, Platform, Probe

if TYPE_CHECKING:
    from hallm.platforms import AttentionBackend


class TemplatePlatform(Platform):
    """A device id of its own that runs on the host CPU (a stand-in for your accelerator)."""

    # ---- identity (data, read without instantiating) ---------------------------------------
    name: ClassVar[str] = "template"  # == the entry-point name in pyproject.toml
    device_type: ClassVar[str] = "cpu"  # the torch device type your tensors live on
    dist_backend: ClassVar[str] = "gloo"  # torch.distributed backend for tensor parallelism
    visible_devices_env: ClassVar[str | None] = None  # e.g. "ACME_VISIBLE_DEVICES"
    ray_resource: ClassVar[str | None] = None  # e.g. "acme_chip" if Ray can schedule it
    # Below every real device, so `--device auto` never picks the template over hardware.
    auto_priority: ClassVar[int] = -10
    # The plugin API version this code was written against. A literal on purpose: importing
    # hallm.platforms.API_VERSION here would always match and defeat the core's version check.
    api_version: ClassVar[str] = "1.0"

    # ---- required ----------------------------------------------------------------------------

    @classmethod
    def probe(cls) -> Probe:
        """Is the device usable here? Cheap, never raises, no needless runtime initialization.

        A real device checks its driver/runtime and counts devices, and returns
        `Probe(False, "<what is missing and how to fix it>")` when it cannot run.
        """
        return Probe(
            available=True,
            reason="template plugin: runs on the host CPU through hallm.ops.reference",
            device_count=1,
        )

    def capabilities(self) -> Capabilities:
        """What the device can do; the first dtype is the default for `--dtype auto`."""
        return Capabilities(
            dtypes=("float32", "bfloat16"),
            kv_cache_dtypes=("auto",),
            graph_capture=False,  # True only if step_graphs() returns a graph runner
            max_world_size=None,  # gloo tensor parallelism works across host processes
            torch_compile=False,
            async_scheduling=False,  # a host device: the step is the host's own work
        )

    def attention_backends(self) -> Sequence[type[AttentionBackend]]:
        """Attention backends, most preferred first (the core picks the first that validates)."""
        from hallm_plugin_template.attention import TemplateAttention

        return [TemplateAttention]

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """(free, total) bytes that can hold weights and KV cache; ask your runtime."""
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    # ---- optional (defaults are shown for reference; delete what you do not change) -----------

    def device_name(self, index: int = 0) -> str:
        """Human-readable device name for logs and `hallm plugins`."""
        return "host CPU (hallm plugin template)"

    # set_device(index), synchronize(), empty_cache(), manual_seed(seed), peak_memory_bytes(),
    # reset_peak_memory(), update_config(config), compile_model(model, config),
    # step_graphs(runner), worker_class(): see hallm.platforms.Platform for their defaults.
