"""The XPU plugin with no Intel GPU and no XPU build of torch: packaging, a light entry point,
the probe's every answer, memory, and which attention backend serves a layer, with each
refusal's reason.

Fakes stand only at the runtime boundary: torch.xpu's functions and the torch build's version.
IPEX is represented by its package metadata (a dist-info folder on sys.path), which is all the
plugin reads before a layer runs it.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from hallm_xpu import attention as xpu_attention
from hallm_xpu import platform as xpu_platform
from hallm_xpu.platform import XpuPlatform

from hallm.core.attention_selector import select_attention_backend
from hallm.ops.reference_backend import ReferenceAttention
from hallm.platforms import API_VERSION, AttentionSpec, BackendSelectionError, DeviceSelectionError, Probe
from hallm.platforms.ops import OpTable

SPEC = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, scale=0.125, dtype="bfloat16", block_size=16)


def test_entry_point_names_the_light_module() -> None:
    (ep,) = entry_points(group="hallm.platforms", name="xpu")
    assert ep.value == "hallm_xpu.plugin"
    assert ep.load().hallm_platform() is XpuPlatform


def test_plugin_and_platform_import_no_torch() -> None:
    code = "import sys, hallm_xpu.plugin, hallm_xpu.platform\nsys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_identity() -> None:
    assert XpuPlatform.name == "xpu" and XpuPlatform.device_type == "xpu"
    assert XpuPlatform.dist_backend == "xccl"
    assert XpuPlatform.visible_devices_env == "ZE_AFFINITY_MASK"
    assert XpuPlatform.api_version == API_VERSION


def test_probe_on_this_machine_agrees_with_torch() -> None:
    probe = XpuPlatform.probe()
    if getattr(torch.version, "xpu", None) is None:
        assert probe == Probe(
            False, "torch is not an XPU build (torch.version.xpu is None): install an XPU build of torch"
        )
    assert probe.available == (torch.version.xpu is not None and torch.xpu.is_available())


def _fake_xpu(monkeypatch: pytest.MonkeyPatch, *, version="20250101", available=True, count=2) -> None:  # type: ignore[no-untyped-def]
    def fake_version() -> str | None:
        if isinstance(version, Exception):
            raise version
        return version

    monkeypatch.setattr(xpu_platform, "torch_xpu_version", fake_version)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: available)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: count)
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda index=0: "Intel(R) Data Center GPU Max 1550")


def test_probe_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZE_AFFINITY_MASK", raising=False)
    _fake_xpu(monkeypatch, version=ModuleNotFoundError("torch"))
    assert XpuPlatform.probe().reason.startswith("torch is not installed")

    _fake_xpu(monkeypatch, available=False)
    assert XpuPlatform.probe() == Probe(False, "no Intel GPU visible to torch.xpu")
    monkeypatch.setenv("ZE_AFFINITY_MASK", "")
    assert XpuPlatform.probe() == Probe(False, "no Intel GPU visible to torch.xpu (ZE_AFFINITY_MASK='')")

    _fake_xpu(monkeypatch, count=2)
    assert XpuPlatform.probe() == Probe(
        True,
        "2 Intel GPU(s) (Intel(R) Data Center GPU Max 1550), torch built for XPU 20250101",
        device_count=2,
    )

    def boom() -> bool:
        raise RuntimeError("level zero failed")

    monkeypatch.setattr(torch.xpu, "is_available", boom)
    probe = XpuPlatform.probe()
    assert not probe.available and "level zero failed" in probe.reason


def test_memory_and_capabilities_come_from_torch_xpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_xpu(monkeypatch, count=4)
    monkeypatch.setattr(
        torch.xpu, "mem_get_info", lambda index=0: (3 << 30, 64 << 30) if index == 1 else (0, 0)
    )
    platform = XpuPlatform()
    assert platform.memory_info(1) == (3 << 30, 64 << 30)
    caps = platform.capabilities()
    assert caps.dtypes[0] == "bfloat16" and caps.max_world_size == 4 and not caps.graph_capture
    assert platform.device(1) == torch.device("xpu", 1)


def _ipex_metadata(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, version: str) -> None:
    """An installed IPEX as far as package metadata goes."""
    info = tmp_path / f"intel_extension_for_pytorch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: intel-extension-for-pytorch\nVersion: {version}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def _backends(monkeypatch: pytest.MonkeyPatch) -> XpuPlatform:
    from hallm.ops.triton.target import TritonTarget

    monkeypatch.setattr(XpuPlatform, "triton_target", lambda self: TritonTarget(num_sms=64))
    return XpuPlatform()


def test_without_intel_triton_or_ipex_the_reference_serves_and_the_others_say_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    platform = _backends(monkeypatch)
    backends = platform.attention_backends()
    assert [b.name for b in backends] == ["xpu_triton", "ipex", "reference"]
    assert [b.dtypes for b in backends[:2]] == [frozenset(), frozenset()]  # they claim nothing here
    assert select_attention_backend(platform, SPEC) is ReferenceAttention
    with pytest.raises(BackendSelectionError, match=r"triton has no Intel backend"):
        select_attention_backend(platform, SPEC, requested="xpu_triton")
    with pytest.raises(
        BackendSelectionError, match=r"intel-extension-for-pytorch is not installed .*hallm-xpu\[ipex\]"
    ):
        select_attention_backend(platform, SPEC, requested="ipex")
    assert platform.op_table() == OpTable()  # the references, without Intel's Triton


def test_an_ipex_built_for_another_torch_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _ipex_metadata(monkeypatch, tmp_path, "2.8.0+xpu")
    platform = _backends(monkeypatch)
    (ipex,) = [b for b in platform.attention_backends() if b.name == "ipex"]
    installed = torch.__version__
    if installed.startswith("2.8."):
        pytest.skip("torch 2.8 is installed")
    assert ipex.validate(SPEC) == [
        f"intel-extension-for-pytorch 2.8.0+xpu is built for torch 2.8.*, but torch {installed} is installed"
    ]
    assert select_attention_backend(platform, SPEC) is ReferenceAttention


def test_an_ipex_built_for_this_torch_is_chosen_before_the_reference(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    major_minor = ".".join(torch.__version__.split(".")[:2])
    _ipex_metadata(monkeypatch, tmp_path, f"{major_minor}.10+xpu")
    platform = _backends(monkeypatch)
    assert select_attention_backend(platform, SPEC).name == "ipex"
    fp32 = AttentionSpec(
        num_heads=4, num_kv_heads=2, head_size=64, scale=0.125, dtype="float32", block_size=16
    )
    assert select_attention_backend(platform, fp32) is ReferenceAttention  # IPEX's flash path: 16-bit only


def test_intel_triton_is_chosen_first_where_its_backend_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(xpu_attention, "intel_triton_reason", lambda: None)
    platform = _backends(monkeypatch)
    chosen = select_attention_backend(platform, SPEC)
    assert chosen.name == "xpu_triton" and chosen(SPEC).target.num_sms == 64  # type: ignore[attr-defined]


def test_the_reference_backend_matches_the_oracle() -> None:
    from hallm.ops.testing import expected_attention, make_paged_batch

    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=16, scale=0.25, dtype="float32", block_size=4)
    batch = make_paged_batch(
        [5, 1], [0, 9], num_heads=4, num_kv_heads=2, head_size=16, block_size=4, num_padding_tokens=1
    )
    out = torch.full_like(batch.query, float("nan"))
    ReferenceAttention(spec).forward(
        batch.query,
        batch.key,
        batch.value,
        batch.kv_cache,
        ReferenceAttention.build_metadata(batch.layout),
        out,
    )
    expected = expected_attention(batch, 0.25)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_explicit_device_selection_says_why_xpu_is_unusable() -> None:
    if XpuPlatform.probe().available:
        pytest.skip("an Intel GPU is visible here")
    from hallm.platforms.registry import select_platform

    with pytest.raises(DeviceSelectionError, match=r"not usable here.*XPU build"):
        select_platform("xpu")


def test_the_hallm_extra_resolves_to_this_distribution() -> None:
    """pip install 'hallm[xpu]' installs hallm-xpu: the core's metadata names it under the extra."""
    from importlib.metadata import distribution, requires

    assert 'hallm-xpu; extra == "xpu"' in (requires("hallm") or [])
    dist = distribution("hallm-xpu")
    assert [ep.name for ep in dist.entry_points if ep.group == "hallm.platforms"] == ["xpu"]
