"""The Neuron plugin with no Neuron device and no Neuron SDK (neither can be installed here):
packaging, a light entry point, the probe's every answer, and the static shape buckets
update_config declares.

Fakes stand only at the runtime boundary: the driver's device nodes, and a torch_neuronx
package on sys.path that behaves like PyPI's placeholder (it raises ImportError on import).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from hallm_neuron import platform as neuron_platform
from hallm_neuron.platform import NeuronPlatform, ShapeBuckets

from hallm.core.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from hallm.ops.reference_backend import ReferenceAttention
from hallm.platforms import API_VERSION, DeviceSelectionError, Probe

PLACEHOLDER = 'raise ImportError("WRONG PACKAGE. Please install the package from Neuron Repository")\n'


def test_entry_point_names_the_light_module() -> None:
    (ep,) = entry_points(group="hallm.platforms", name="neuron")
    assert ep.value == "hallm_neuron.plugin"
    assert ep.load().hallm_platform() is NeuronPlatform


def test_plugin_and_platform_import_no_torch() -> None:
    code = "import sys, hallm_neuron.plugin, hallm_neuron.platform\nsys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_identity() -> None:
    assert NeuronPlatform.name == "neuron" and NeuronPlatform.device_type == "xla"
    assert NeuronPlatform.visible_devices_env == "NEURON_RT_VISIBLE_CORES"
    assert NeuronPlatform.api_version == API_VERSION
    assert NeuronPlatform().attention_backends() == [ReferenceAttention]


def test_probe_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(neuron_platform, "neuron_devices", lambda: [])
    monkeypatch.setattr(neuron_platform, "runtime_installed", lambda: False)
    assert NeuronPlatform.probe() == Probe(
        False, "no Neuron device (/dev/neuron* not found); torch-neuronx is not installed either"
    )
    monkeypatch.setattr(neuron_platform, "neuron_devices", lambda: ["/dev/neuron0", "/dev/neuron1"])
    assert NeuronPlatform.probe().reason.startswith("2 Neuron device(s), but torch-neuronx is not installed")

    (tmp_path / "torch_neuronx").mkdir()
    (tmp_path / "torch_neuronx" / "__init__.py").write_text(PLACEHOLDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_neuronx", raising=False)
    monkeypatch.setattr(neuron_platform, "runtime_installed", lambda: True)
    probe = NeuronPlatform.probe()
    assert not probe.available and probe.reason.startswith("torch-neuronx does not import: WRONG PACKAGE")

    (tmp_path / "torch_neuronx" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "torch_neuronx", raising=False)
    assert NeuronPlatform.probe() == Probe(True, "2 Neuron device(s)", device_count=2)


def test_probe_on_this_machine_says_what_is_missing() -> None:
    probe = NeuronPlatform.probe()
    if not neuron_platform.neuron_devices():
        assert not probe.available and probe.reason.startswith("no Neuron device (/dev/neuron* not found)")


def _config(max_tokens: int, max_seqs: int, max_model_len: int) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig("m", None, "bfloat16", max_model_len, 0, "auto"),
        cache=CacheConfig(block_size=16),
        scheduler=SchedulerConfig(
            max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens, async_scheduling=True
        ),
        parallel=ParallelConfig(),
        device={},
    )


def test_update_config_declares_static_buckets() -> None:
    platform = NeuronPlatform()
    config = _config(max_tokens=1000, max_seqs=24, max_model_len=1000)
    platform.update_config(config)
    assert config.scheduler.max_num_batched_tokens == 1024 and config.scheduler.max_num_seqs == 32
    assert config.model.max_model_len == 1008 and not config.scheduler.async_scheduling
    assert platform.buckets == ShapeBuckets(tokens=(128, 256, 512, 1024), seqs=(1, 2, 4, 8, 16, 32))

    small = NeuronPlatform()
    small.update_config(_config(max_tokens=64, max_seqs=1, max_model_len=64))
    assert small.buckets == ShapeBuckets(tokens=(128,), seqs=(1,))


def test_explicit_device_selection_says_why_neuron_is_unusable() -> None:
    if NeuronPlatform.probe().available:
        pytest.skip("a Neuron device is usable here")
    from hallm.platforms.registry import select_platform

    with pytest.raises(DeviceSelectionError, match=r"not usable here.*Neuron"):
        select_platform("neuron")


def test_the_hallm_extra_resolves_to_this_distribution() -> None:
    """pip install 'hallm[neuron]' installs hallm-neuron: the core's metadata names it under the extra."""
    from importlib.metadata import distribution, requires

    assert 'hallm-neuron; extra == "neuron"' in (requires("hallm") or [])
    dist = distribution("hallm-neuron")
    assert [ep.name for ep in dist.entry_points if ep.group == "hallm.platforms"] == ["neuron"]
