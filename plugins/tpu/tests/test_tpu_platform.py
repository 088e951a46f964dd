"""TpuPlatform: the probe's reasons (no jax backend initialized), JAX_PLATFORMS=cpu mode, device
selection (explicit vs auto), capabilities, memory info, and `hallm plugins`."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from hallm_tpu import platform as tpu_platform
from hallm_tpu.platform import TpuPlatform, jax_cpu_requested, visible_chips

from hallm.platforms import ConfigError, DeviceSelectionError
from hallm.platforms.registry import plugin_report, select_platform


def probe_with(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], libtpu: bool, files: list[str]):
    real_find_spec = tpu_platform.importlib.util.find_spec

    def find_spec(name: str):
        if name == "libtpu":
            return object() if libtpu else None
        return real_find_spec(name)

    monkeypatch.setattr(tpu_platform.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(tpu_platform, "tpu_device_files", lambda: files)
    return tpu_platform._probe(env)


def test_probe_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    no_lib = probe_with(monkeypatch, {}, libtpu=False, files=[])
    assert not no_lib.available and "libtpu" in no_lib.reason and "JAX_PLATFORMS=cpu" in no_lib.reason
    no_dev = probe_with(monkeypatch, {}, libtpu=True, files=[])
    assert not no_dev.available and "/dev/accel" in no_dev.reason
    chips = ["/dev/accel0", "/dev/accel1", "/dev/accel2", "/dev/accel3"]
    four = probe_with(monkeypatch, {}, libtpu=True, files=chips)
    assert four.available and four.device_count == 4
    two = probe_with(monkeypatch, {"TPU_VISIBLE_CHIPS": "0,3"}, libtpu=True, files=chips)
    assert two.available and two.device_count == 2 and "TPU_VISIBLE_CHIPS" in two.reason
    bad = probe_with(monkeypatch, {"TPU_VISIBLE_CHIPS": "0,7"}, libtpu=True, files=chips)
    assert not bad.available and "[7]" in bad.reason
    cpu = probe_with(monkeypatch, {"JAX_PLATFORMS": "cpu"}, libtpu=False, files=[])
    assert cpu.available and cpu.reason.startswith("available: JAX CPU backend, for testing")
    for env in ({"TPU_VISIBLE_CHIPS": ""}, {"TPU_VISIBLE_CHIPS": "", "JAX_PLATFORMS": "cpu"}):
        hidden = probe_with(monkeypatch, env, libtpu=True, files=chips)
        assert not hidden.available and "hidden" in hidden.reason


def test_env_parsing() -> None:
    assert jax_cpu_requested({"JAX_PLATFORMS": "cpu"}) and jax_cpu_requested({"JAX_PLATFORMS": " CPU,tpu"})
    assert not jax_cpu_requested({"JAX_PLATFORMS": "tpu,cpu"}) and not jax_cpu_requested({})
    assert visible_chips({}) is None and visible_chips({"TPU_VISIBLE_CHIPS": "1, 2"}) == [1, 2]
    assert visible_chips({"TPU_VISIBLE_CHIPS": ""}) == []
    with pytest.raises(ValueError, match="TPU_VISIBLE_CHIPS"):
        visible_chips({"TPU_VISIBLE_CHIPS": "one"})


def test_probe_and_plugin_list_import_no_jax() -> None:
    code = (
        "import sys\n"
        "from hallm.platforms.registry import plugin_report\n"
        "rows = {r.name: r for r in plugin_report()}\n"
        "print(rows['tpu'].available, rows['tpu'].reason)\n"
        "assert 'jax' not in sys.modules, 'probing imported jax'\n"
    )
    env_out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={"PATH": ""}
    )
    assert env_out.returncode == 0, env_out.stderr
    assert env_out.stdout.startswith("False libtpu"), env_out.stdout


def test_explicit_without_tpu_is_an_error_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAX_PLATFORMS")
    with pytest.raises(DeviceSelectionError, match="libtpu"):
        select_platform("tpu")


def test_jax_cpu_mode_explicit_only() -> None:
    assert select_platform("tpu").probe.available
    # Ranked below the CPU plugin: --device auto never chooses the test mode.
    assert TpuPlatform.auto_priority < 0
    assert select_platform("auto").device_id != "tpu"
    (row,) = [r for r in plugin_report() if r.name == "tpu"]
    assert row.available and row.reason.startswith("available: JAX CPU backend")


def test_capabilities_memory_and_identity() -> None:
    p = TpuPlatform()
    caps = p.capabilities()
    assert caps.dtypes == ("bfloat16", "float32")
    assert (p.visible_devices_env, p.ray_resource) == ("TPU_VISIBLE_CHIPS", "TPU")
    free, total = p.memory_info()
    assert 0 < free <= total
    assert "not a TPU" in p.device_name()


def test_update_config_refuses_what_it_cannot_run() -> None:
    def config(model_type: str, backend: str | None = None, kv: str = "auto") -> SimpleNamespace:
        return SimpleNamespace(
            model=SimpleNamespace(hf_config=SimpleNamespace(model_type=model_type)),
            cache=SimpleNamespace(kv_cache_dtype=kv),
            attention_backend=backend,
        )

    p = TpuPlatform()
    p.update_config(config("qwen3", "jax_paged"))
    with pytest.raises(ConfigError, match="Llama family"):
        p.update_config(config("gpt_neox"))
    with pytest.raises(ConfigError, match="jax_paged"):
        p.update_config(config("llama", "flash"))
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        p.update_config(config("llama", kv="fp8"))
