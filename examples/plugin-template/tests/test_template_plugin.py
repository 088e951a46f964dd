"""The template plugin's own tests: what a vendor keeps (and extends) when adapting it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from hallm_plugin_template.attention import TemplateAttention
from hallm_plugin_template.platform import TemplatePlatform

from hallm.ops.testing import expected_attention, make_paged_batch
from hallm.platforms import AttentionSpec, Capabilities, Platform, Probe


def test_entry_point_returns_the_platform():
    (ep,) = entry_points(group="hallm.platforms", name="template")
    assert ep.value == "hallm_plugin_template.plugin"
    platform_cls = ep.load().hallm_platform()
    assert platform_cls is TemplatePlatform and issubclass(platform_cls, Platform)


def test_entry_point_module_imports_no_torch():
    code = "import sys, hallm_plugin_template.plugin, hallm_plugin_template.platform; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_identity_never_wins_auto():
    assert TemplatePlatform.name == "template"
    assert TemplatePlatform.device_type == "cpu"
    assert TemplatePlatform.auto_priority < 0
    assert TemplatePlatform.api_version == "1.0"


def test_probe_capabilities_memory():
    probe = TemplatePlatform.probe()
    assert isinstance(probe, Probe) and probe.available and probe.device_count == 1
    assert "hallm.ops.reference" in probe.reason
    platform = TemplatePlatform()
    assert isinstance(platform.capabilities(), Capabilities)
    assert platform.capabilities().dtypes[0] == "float32"
    free, total = platform.memory_info()
    assert 0 < free <= total


def test_backend_rejects_what_it_does_not_support():
    assert TemplatePlatform().attention_backends() == [TemplateAttention]
    assert TemplateAttention.validate(AttentionSpec(4, 2, 64, 0.125, "bfloat16", sliding_window=8)) == []
    reasons = TemplateAttention.validate(AttentionSpec(4, 2, 64, 0.125, "float16"))
    assert reasons and "float16" in reasons[0]


@pytest.mark.parametrize("with_tensors", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_matches_reference(dtype, with_tensors):
    batch = make_paged_batch(
        [7, 1, 3, 1],
        [0, 9, 4, 16],
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=dtype,
        with_tensors=with_tensors,
        num_padding_tokens=1,
    )
    spec = AttentionSpec(8, 2, 64, 0.125, "float32" if dtype == torch.float32 else "bfloat16", block_size=16)
    backend = TemplateAttention(spec)
    out = torch.empty_like(batch.query)
    backend.forward(
        batch.query, batch.key, batch.value, batch.kv_cache, backend.build_metadata(batch.layout), out
    )
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected_attention(batch, 0.125), atol=tol, rtol=tol)
