"""The ROCm plugin without an AMD GPU: packaging, a light entry point, the probe's every answer
(beside hallm-cuda's on the same torch builds: exactly one of them claims a GPU), capabilities by
gfx architecture, and the shared Triton kernels under the interpreter with this plugin's target.

Fakes stand only at the device-runtime boundary: the torch build's versions, the driver node,
torch.cuda's device count and device properties.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch
from hallm_rocm import platform as rocm_platform
from hallm_rocm.platform import ARCH_DTYPES, RocmPlatform

from hallm.platforms import API_VERSION, ConfigError, DeviceSelectionError, Probe

MI300X = SimpleNamespace(multi_processor_count=304, gcnArchName="gfx942:sramecc+:xnack-")


def test_entry_point_names_the_light_module() -> None:
    (ep,) = entry_points(group="hallm.platforms", name="rocm")
    assert ep.value == "hallm_rocm.plugin"
    assert ep.load().hallm_platform() is RocmPlatform


def test_plugin_and_platform_import_neither_torch_nor_triton_and_the_probe_initializes_no_hip() -> None:
    code = (
        "import sys, hallm_rocm.plugin, hallm_rocm.platform\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules\n"
        "p = hallm_rocm.platform.RocmPlatform.probe()\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(p.available, p.reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if torch.version.hip is None:
        assert out.stdout.startswith("False ")


def test_identity() -> None:
    assert RocmPlatform.name == "rocm"
    assert RocmPlatform.device_type == "cuda"  # a ROCm build of torch names HIP devices "cuda"
    assert RocmPlatform.dist_backend == "nccl"  # RCCL
    assert RocmPlatform.visible_devices_env == "HIP_VISIBLE_DEVICES"
    assert RocmPlatform.ray_resource == "GPU"
    assert RocmPlatform.api_version == API_VERSION


def test_probe_on_this_machine_agrees_with_torch() -> None:
    probe = RocmPlatform.probe()
    assert isinstance(probe, Probe)
    if torch.version.hip is None:
        assert not probe.available
        expected = "CPU-only torch build" if torch.version.cuda is None else "torch is a CUDA build"
        assert probe.reason.startswith(expected)


def _fake(
    monkeypatch: pytest.MonkeyPatch, module, *, version=(None, "6.2.41133"), driver=True, count=1
) -> None:  # type: ignore[no-untyped-def]
    """Fake a torch build, driver and device count for `module` (hallm_rocm.platform or
    hallm_cuda.platform): the same host, as each plugin's probe sees it."""

    def fake_version() -> tuple[str | None, str | None]:
        if isinstance(version, Exception):
            raise version
        return version

    name = "torch_build_versions" if module is rocm_platform else "torch_cuda_version"
    monkeypatch.setattr(module, name, fake_version)
    if module is rocm_platform:
        monkeypatch.setattr(module, "driver_present", lambda: driver)
    else:
        monkeypatch.setattr(module, "driver_library", lambda: "libcuda.so.1" if driver else None)
    monkeypatch.setattr(module, "device_count", lambda: count)


def test_probe_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    _fake(monkeypatch, rocm_platform, version=ModuleNotFoundError("torch"))
    assert RocmPlatform.probe().reason.startswith("torch is not installed")

    _fake(monkeypatch, rocm_platform, version=("12.4", None))
    probe = RocmPlatform.probe()
    assert (
        not probe.available and "CUDA build (CUDA 12.4)" in probe.reason and "--device cuda" in probe.reason
    )

    _fake(monkeypatch, rocm_platform, version=(None, None))
    assert RocmPlatform.probe().reason.startswith("CPU-only torch build (torch.version.hip is None)")

    _fake(monkeypatch, rocm_platform, driver=False)
    assert RocmPlatform.probe() == Probe(
        False, "no AMD GPU driver (/dev/kfd not found; torch is built for HIP 6.2.41133)"
    )

    _fake(monkeypatch, rocm_platform, count=0)
    assert RocmPlatform.probe() == Probe(False, "no AMD GPU visible")
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "")
    assert RocmPlatform.probe() == Probe(False, "no AMD GPU visible (HIP_VISIBLE_DEVICES='')")

    _fake(monkeypatch, rocm_platform, count=8)
    assert RocmPlatform.probe() == Probe(True, "8 AMD GPU(s), torch built for HIP 6.2.41133", device_count=8)

    def boom() -> int:
        raise RuntimeError("hipErrorNoDevice")

    monkeypatch.setattr(rocm_platform, "device_count", boom)
    probe = RocmPlatform.probe()
    assert not probe.available and "hipErrorNoDevice" in probe.reason


@pytest.mark.parametrize(
    ("build", "claimant"),
    [(("12.4", None), "cuda"), ((None, "6.2"), "rocm"), ((None, None), None)],
    ids=["cuda-build", "rocm-build", "cpu-build"],
)
def test_the_cuda_and_rocm_probes_side_by_side(monkeypatch: pytest.MonkeyPatch, build, claimant) -> None:  # type: ignore[no-untyped-def]
    """On one host with a driver and a visible GPU, the torch build decides which plugin claims
    it: never both, and the ROCm plugin never an NVIDIA GPU."""
    hallm_cuda_platform = pytest.importorskip("hallm_cuda.platform")
    _fake(monkeypatch, rocm_platform, version=build)
    _fake(monkeypatch, hallm_cuda_platform, version=build)
    got = {
        "rocm": RocmPlatform.probe(),
        "cuda": hallm_cuda_platform.CudaPlatform.probe(),
    }
    assert {name for name, p in got.items() if p.available} == ({claimant} if claimant else set())
    if build[1] is not None:
        assert "use --device rocm" in got["cuda"].reason
    if build[0] is not None:
        assert "use --device cuda" in got["rocm"].reason


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, props: SimpleNamespace = MI300X, count: int = 8) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "AMD Instinct MI300X")
    monkeypatch.setattr(rocm_platform, "device_count", lambda: count)


@pytest.mark.parametrize("arch", ["gfx90a:sramecc+:xnack-", "gfx942:sramecc+:xnack-", "gfx942"])
def test_capabilities_by_architecture(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    _fake_gpu(monkeypatch, SimpleNamespace(multi_processor_count=110, gcnArchName=arch), count=4)
    platform = RocmPlatform()
    caps = platform.capabilities()
    assert caps.dtypes == ("bfloat16", "float16", "float32")
    assert caps.graph_capture and caps.max_world_size == 4
    platform.update_config(object())  # a checked architecture is accepted
    assert platform.device_name() == f"AMD Instinct MI300X ({arch.split(':')[0]})"


def test_an_unchecked_architecture_is_refused_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpu(monkeypatch, SimpleNamespace(multi_processor_count=48, gcnArchName="gfx1100"))
    platform = RocmPlatform()
    assert platform.capabilities().dtypes == ("float16", "float32")
    with pytest.raises(ConfigError, match=r"'gfx1100' is not one .*gfx90a, gfx942"):
        platform.update_config(object())
    assert set(ARCH_DTYPES) == {"gfx90a", "gfx942"}


def test_triton_target_has_the_cu_count_and_never_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpu(monkeypatch)
    platform = RocmPlatform()
    target = platform.triton_target()
    assert target.num_sms == 304 and target.pdl is False
    # the launch parameters follow from the architecture's facts: 64-wide wavefronts, 64 KiB LDS
    assert (target.backend, target.warp_size, target.shared_memory_bytes) == ("hip", 64, 64 * 1024)
    from hallm.ops.triton.target import TritonTarget

    with pytest.raises(ValueError, match="programmatic dependent launch is a CUDA feature"):
        TritonTarget(num_sms=304, pdl=True, backend="hip", warp_size=64)
    from hallm.ops.triton.runtime import pdl_launch

    assert pdl_launch(target) == {"USE_PDL": False}


def test_explicit_device_selection_says_why_rocm_is_unusable() -> None:
    if torch.version.hip is not None and torch.cuda.device_count() > 0:
        pytest.skip("an AMD GPU is visible here")
    from hallm.platforms.registry import select_platform

    with pytest.raises(DeviceSelectionError, match=r"not usable here.*torch"):
        select_platform("rocm")


def test_attention_and_op_table_run_the_shared_kernels_with_this_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Triton backend and the op table, interpreted on the host with the ROCm target."""
    pytest.importorskip("triton")
    from hallm.ops.reference_ops import rms_norm as reference_rms_norm
    from hallm.ops.testing import expected_attention, make_paged_batch
    from hallm.platforms import AttentionSpec

    _fake_gpu(monkeypatch)
    platform = RocmPlatform()
    (backend,) = platform.attention_backends()
    assert platform.attention_backends() == [backend]
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, scale=0.25, dtype="float32", block_size=4)
    assert backend.validate(spec) == []
    impl = backend(spec)
    assert impl.target == platform.triton_target()
    batch = make_paged_batch(
        [5, 1], [0, 9], num_heads=4, num_kv_heads=2, head_size=16, block_size=4, num_padding_tokens=1
    )
    out = torch.full_like(batch.query, float("nan"))
    impl.forward(
        batch.query, batch.key, batch.value, batch.kv_cache, backend.build_metadata(batch.layout), out
    )
    expected = expected_attention(batch, 0.25)
    assert (out.double() - expected).norm() / expected.norm() < 1e-5

    table = platform.op_table()
    x, residual, w = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    got = table.rms_norm(x, w, 1e-6, residual)
    want = reference_rms_norm(x, w, 1e-6, residual)
    assert isinstance(got, tuple) and isinstance(want, tuple)
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(got, want, strict=True))


def test_the_hallm_extra_resolves_to_this_distribution() -> None:
    """pip install 'hallm[rocm]' installs hallm-rocm: the core's metadata names it under the extra."""
    from importlib.metadata import distribution, requires

    assert 'hallm-rocm; extra == "rocm"' in (requires("hallm") or [])
    dist = distribution("hallm-rocm")
    assert [ep.name for ep in dist.entry_points if ep.group == "hallm.platforms"] == ["rocm"]
