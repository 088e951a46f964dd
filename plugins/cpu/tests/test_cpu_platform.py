"""The CPU platform on this machine's real CPU: identity, probe, capabilities, memory, backend."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from hallm_cpu.attention import CpuReferenceAttention
from hallm_cpu.platform import CpuPlatform, cgroup_memory, cpu_model_name, usable_cores

from hallm.ops.testing import expected_attention, make_paged_batch
from hallm.platforms import API_VERSION, AttentionSpec, Capabilities, Probe


def test_entry_point_names_the_light_module():
    (ep,) = entry_points(group="hallm.platforms", name="cpu")
    assert ep.value == "hallm_cpu.plugin"
    assert ep.load().hallm_platform() is CpuPlatform


def test_plugin_and_platform_import_no_torch():
    code = "import sys, hallm_cpu.plugin, hallm_cpu.platform; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_identity():
    assert CpuPlatform.name == "cpu"
    assert CpuPlatform.device_type == "cpu"
    assert CpuPlatform.dist_backend == "gloo"
    assert CpuPlatform.auto_priority == 0
    assert CpuPlatform.api_version == API_VERSION
    assert CpuPlatform().describe()["name"] == "cpu"
    assert CpuPlatform().device(0) == torch.device("cpu", 0)


def test_probe_is_available_and_says_why():
    probe = CpuPlatform.probe()
    assert isinstance(probe, Probe)
    assert probe.available and probe.device_count == 1
    assert probe.reason.startswith(f"host CPU, {usable_cores()} cores")
    assert f"torch threads {torch.get_num_threads()}" in probe.reason  # torch is loaded here


def test_capabilities():
    caps = CpuPlatform().capabilities()
    assert isinstance(caps, Capabilities)
    assert caps.dtypes == ("float32", "bfloat16")
    assert caps.kv_cache_dtypes == ("auto",)
    assert not caps.graph_capture and not caps.torch_compile
    assert caps.max_world_size is None


def test_memory_info_is_positive():
    free, total = CpuPlatform().memory_info()
    assert 0 < free <= total


def test_device_name_names_the_cpu():
    name = CpuPlatform().device_name()
    assert name.startswith(cpu_model_name()) and name.endswith(f"({torch.get_num_threads()} threads)")
    assert cpu_model_name()


@pytest.mark.parametrize(
    ("files", "want"),
    [
        ({"memory.max": "max\n", "memory.current": "5\n"}, None),
        ({"memory.max": "1000\n", "memory.current": "300\n"}, (1000, 300)),
        ({"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "1"}, None),
        ({"memory/memory.limit_in_bytes": "4096", "memory/memory.usage_in_bytes": "96"}, (4096, 96)),
        ({}, None),
    ],
)
def test_cgroup_memory(tmp_path, files, want):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cgroup_memory(tmp_path) == want


@pytest.mark.parametrize("index", [0, 1])
def test_attention_backend_declarations(index):
    backends = CpuPlatform().attention_backends()
    assert backends[1] is CpuReferenceAttention  # the fallback when the native kernels do not build
    backend = backends[index]
    ok = AttentionSpec(8, 2, 80, 0.1, "bfloat16", block_size=3, sliding_window=7, logits_soft_cap=30.0)
    assert backend.validate(ok) == []
    bad = AttentionSpec(8, 2, 64, 0.1, "float16", kv_cache_dtype="fp8_e4m3")
    reasons = backend.validate(bad)
    assert any("float16" in r for r in reasons) and any("fp8_e4m3" in r for r in reasons)


def test_forward_from_host_arrays_only():
    """A layout without device tensors works too (the backend builds them from numpy)."""
    batch = make_paged_batch(
        [9, 1, 4, 1],
        [0, 12, 6, 3],
        num_heads=4,
        num_kv_heads=2,
        head_size=32,
        block_size=4,
        with_tensors=False,
        num_padding_tokens=2,
    )
    spec = AttentionSpec(4, 2, 32, 0.2, "float32", block_size=4, sliding_window=6)
    backend = CpuReferenceAttention(spec)
    out = torch.empty_like(batch.query)
    meta = backend.build_metadata(batch.layout)
    assert backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, meta, out) is out
    torch.testing.assert_close(out.double(), expected_attention(batch, 0.2, 6), atol=2e-5, rtol=2e-5)
