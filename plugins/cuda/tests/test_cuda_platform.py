"""The CUDA plugin without a GPU: packaging, a light entry point, the probe's every answer,
capabilities by compute capability, and the decode-graph helpers that need no device.

What needs a GPU (memory, graphs, the kernels compiled) runs in tests/gpu/ on the GPU machine.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from hallm_cuda import platform as cuda_platform
from hallm_cuda.platform import CudaPlatform, torch_cuda_version

from hallm.ops.torch_cuda_runtime import version_field as _version_field
from hallm.platforms import API_VERSION, Capabilities, DeviceSelectionError, Probe


def test_entry_point_names_the_light_module() -> None:
    (ep,) = entry_points(group="hallm.platforms", name="cuda")
    assert ep.value == "hallm_cuda.plugin"
    assert ep.load().hallm_platform() is CudaPlatform


def test_plugin_and_platform_import_neither_torch_nor_triton() -> None:
    code = (
        "import sys, hallm_cuda.plugin, hallm_cuda.platform\n"
        "sys.exit(('torch' in sys.modules) * 1 + ('triton' in sys.modules) * 2)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_identity() -> None:
    assert CudaPlatform.name == "cuda"
    assert CudaPlatform.device_type == "cuda"
    assert CudaPlatform.dist_backend == "nccl"
    assert CudaPlatform.visible_devices_env == "CUDA_VISIBLE_DEVICES"
    assert CudaPlatform.ray_resource == "GPU"
    assert CudaPlatform.auto_priority == 100
    assert CudaPlatform.api_version == API_VERSION


def test_probe_on_this_machine_never_raises_and_agrees_with_torch() -> None:
    import torch

    probe = CudaPlatform.probe()
    assert isinstance(probe, Probe)
    if torch.version.cuda is None:
        assert not probe.available
        assert probe.reason.startswith("CPU-only torch build")
    assert probe.available == (torch.version.cuda is not None and torch.cuda.device_count() > 0)


def test_probe_of_a_cpu_build_imports_no_torch_and_initializes_no_cuda() -> None:
    code = (
        "import sys\n"
        "from hallm_cuda.platform import CudaPlatform\n"
        "p = CudaPlatform.probe()\n"
        "import torch\n"
        "if torch.version.cuda is None:\n"
        "    assert 'CPU-only torch build' in p.reason, p\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(p.available)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("True", "False")


@pytest.mark.parametrize(
    ("text", "cuda"),
    [
        (
            "__version__ = '2.13.0+cpu'\ndebug = False\ncuda: Optional[str] = None\nhip: Optional[str] = None\n",
            None,
        ),
        ("__version__ = '2.11.0+cu130'\ncuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n", "13.0"),
        ("cuda = '12.4'\nhip = None\n", "12.4"),
    ],
)
def test_version_file_parsing(text: str, cuda: str | None) -> None:
    assert _version_field(text, "cuda") == cuda
    assert _version_field(text, "hip") is None


def test_torch_cuda_version_reads_the_loaded_module() -> None:
    import torch

    assert torch_cuda_version() == (torch.version.cuda, getattr(torch.version, "hip", None))


def _fake(monkeypatch: pytest.MonkeyPatch, *, version=("12.4", None), driver="libcuda.so.1", count=1) -> None:  # type: ignore[no-untyped-def]
    def fake_version() -> tuple[str | None, str | None]:
        if isinstance(version, Exception):
            raise version
        return version

    monkeypatch.setattr(cuda_platform, "torch_cuda_version", fake_version)
    monkeypatch.setattr(cuda_platform, "driver_library", lambda: driver)
    monkeypatch.setattr(cuda_platform, "device_count", lambda: count)


def test_probe_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, version=ModuleNotFoundError("torch"))
    assert CudaPlatform.probe() == Probe(False, "torch is not installed (pip install torch)")

    _fake(monkeypatch, version=(None, "6.2"))
    assert "ROCm build" in CudaPlatform.probe().reason

    _fake(monkeypatch, version=(None, None))
    assert CudaPlatform.probe().reason.startswith("CPU-only torch build")

    _fake(monkeypatch, driver=None)
    probe = CudaPlatform.probe()
    assert not probe.available and probe.reason.startswith("no NVIDIA driver")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _fake(monkeypatch, count=0)
    assert CudaPlatform.probe() == Probe(False, "no device visible (CUDA_VISIBLE_DEVICES='')")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert CudaPlatform.probe() == Probe(False, "no device visible")

    _fake(monkeypatch, count=2)
    probe = CudaPlatform.probe()
    assert probe.available and probe.device_count == 2 and "CUDA 12.4" in probe.reason


def test_probe_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch)

    def boom() -> int:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(cuda_platform, "device_count", boom)
    probe = CudaPlatform.probe()
    assert not probe.available and "driver exploded" in probe.reason


@pytest.mark.parametrize(
    ("cap", "dtypes"),
    [
        ((9, 0), ("bfloat16", "float16", "float32")),
        ((8, 0), ("bfloat16", "float16", "float32")),
        ((7, 5), ("float16", "float32")),
    ],
)
def test_capabilities_by_compute_capability(monkeypatch: pytest.MonkeyPatch, cap, dtypes) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(CudaPlatform, "compute_capability", lambda self, index=0: cap)
    monkeypatch.setattr(cuda_platform, "device_count", lambda: 4)
    caps = CudaPlatform().capabilities()
    assert isinstance(caps, Capabilities)
    assert caps.dtypes == dtypes
    assert caps.graph_capture and caps.max_world_size == 4


def test_old_gpus_are_refused_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from hallm.platforms import ConfigError

    monkeypatch.setattr(CudaPlatform, "compute_capability", lambda self, index=0: (7, 0))
    with pytest.raises(ConfigError, match=r"compute capability 7\.0"):
        CudaPlatform().update_config(object())


def test_explicit_device_selection_says_why_cuda_is_unusable() -> None:
    import torch

    if torch.version.cuda is not None and torch.cuda.device_count() > 0:
        pytest.skip("a GPU is visible here")
    from hallm.platforms.registry import select_platform

    with pytest.raises(DeviceSelectionError, match="not usable here"):
        select_platform("cuda")


def test_attention_backends_are_the_triton_backend_for_this_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from hallm.ops.triton.backend import TritonPagedAttention
    from hallm.ops.triton.target import TritonTarget
    from hallm.platforms import AttentionSpec

    target = TritonTarget(num_sms=78, pdl=True)
    monkeypatch.setattr(CudaPlatform, "triton_target", lambda self: target)
    platform = CudaPlatform()
    (backend,) = platform.attention_backends()
    # the same class every time: the model runner builds one metadata per backend class and step
    assert platform.attention_backends() == [backend]
    assert issubclass(backend, TritonPagedAttention) and backend.graph_safe
    spec = AttentionSpec(num_heads=14, num_kv_heads=2, head_size=64, scale=0.125, dtype="bfloat16")
    assert backend.name == "triton" and backend(spec).target == target
    spec = AttentionSpec(
        num_heads=14, num_kv_heads=2, head_size=64, scale=0.125, dtype="bfloat16", block_size=16
    )
    assert backend.validate(spec) == []
    spec = AttentionSpec(
        num_heads=8, num_kv_heads=8, head_size=128, scale=0.1, dtype="float32", sliding_window=64
    )
    assert backend.validate(spec) == []


def test_triton_target_is_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """SMs and opt-in shared memory from the device's properties (an H100's here), PDL from
    sm_90; a torch without the opt-in field gives the smallest NVIDIA block's limit."""
    import types

    import torch

    from hallm.ops.triton.target import NVIDIA_SHARED_MEMORY

    h100 = types.SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=232448)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: h100)
    monkeypatch.setattr(CudaPlatform, "compute_capability", lambda self, index=0: (9, 0))
    target = CudaPlatform().triton_target()
    assert (target.num_sms, target.shared_memory_bytes, target.pdl) == (132, 232448, True)
    a100 = types.SimpleNamespace(multi_processor_count=108)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: a100)
    monkeypatch.setattr(CudaPlatform, "compute_capability", lambda self, index=0: (8, 0))
    target = CudaPlatform().triton_target()
    assert (target.num_sms, target.shared_memory_bytes, target.pdl) == (108, NVIDIA_SHARED_MEMORY, False)
