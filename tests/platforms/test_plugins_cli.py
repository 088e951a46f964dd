"""`hallm plugins` over fake plugin distributions, import hygiene, and CLI error handling."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.entrypoints import cli
from hallm.entrypoints.cli import add_device_arg, main
from hallm.platforms import API_VERSION, DeviceSelectionError, registry


def _rows(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["group"], row["name"]): row for row in report["plugins"]}


def test_plugins_table_lists_every_plugin_with_probe_backends_and_errors(
    mixed_site: Path, run_py: Any
) -> None:
    proc = run_py(mixed_site, "-m", "hallm.entrypoints.cli", "plugins", "--probe-timeout", "1")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert lines["fakecpu"].split()[1:7] == ["hallm-fakecpu", "0.3.0", "1.0", "10", "available", "(1)"]
    assert "fake_tiny, fake_sdpa, ext_attn" in lines["fakecpu"]
    assert "not loaded" in lines["broken"]
    assert (
        "PluginLoadError" in lines["broken"]
        and "No module named 'broken_runtime_that_is_missing'" in lines["broken"]
    )
    assert "probe raised RuntimeError: driver exploded" in lines["raiser"]
    assert "probe did not return within 1s" in lines["hanger"]
    assert "PluginAPIVersionError" in lines["future"]
    assert "hallm_platfrom" in lines["typo"]
    assert "executor:fakeexec" in lines["fakeext"]
    assert "badext needs libbadext.so" in lines["badext"]
    assert "--device auto would choose: fastdev" in proc.stdout


HYGIENE = """
import contextlib, io, json, sys
import hallm, hallm.platforms
after_import = {m: m in sys.modules for m in ("torch", "fake_device_runtime", "fakecpu_plugin")}
from hallm.entrypoints.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["plugins", "--json", "--probe-timeout", "1"])
after_plugins = {m: m in sys.modules for m in ("fake_device_runtime", "fakecpu_kernels")}
print(json.dumps({"rc": rc, "report": json.loads(out.getvalue()), "after_import": after_import,
                  "after_plugins": after_plugins}))
"""


@pytest.fixture(scope="module")
def hygiene(mixed_site: Path, run_py: Any, parse_last_json: Callable[..., Any]) -> dict[str, Any]:
    result: dict[str, Any] = parse_last_json(run_py(mixed_site, "-c", HYGIENE))
    return result


def test_plugins_json_reports_broken_plugins_as_rows(hygiene: dict[str, Any]) -> None:
    assert hygiene["rc"] == 0
    report = hygiene["report"]
    assert report["api_version"] == API_VERSION and report["auto_choice"] == "fastdev"
    rows = _rows(report)
    fakecpu = rows["hallm.platforms", "fakecpu"]
    assert fakecpu["distribution"] == "hallm-fakecpu" and fakecpu["version"] == "0.3.0"
    assert fakecpu["api_version"] == "1.0" and fakecpu["available"] is True and fakecpu["device_count"] == 1
    assert fakecpu["attention_backends"] == ["fake_tiny", "fake_sdpa", "ext_attn"]
    assert fakecpu["error"] is None
    broken = rows["hallm.platforms", "broken"]
    assert broken["available"] is None and broken["api_version"] is None
    assert broken["error"].startswith("PluginLoadError: device plugin 'broken' (hallm-broken 0.1.0")
    assert rows["hallm.platforms", "hanger"]["reason"] == "probe did not return within 1s"
    assert rows["hallm.platforms", "offdev"]["available"] is False
    assert rows["hallm.plugins", "fakeext"]["contributes"] == ["executor:fakeexec"]
    assert "badext needs libbadext.so" in rows["hallm.plugins", "badext"]["error"]


def test_import_hallm_and_hallm_plugins_import_no_device_runtime(hygiene: dict[str, Any]) -> None:
    assert hygiene["after_import"] == {"torch": False, "fake_device_runtime": False, "fakecpu_plugin": False}
    # The kernels module was imported (to list its backends), its runtime was not. (torch is not
    # checked here: a real plugin installed in the venv, such as hallm-cpu, may use it.)
    assert hygiene["after_plugins"] == {"fake_device_runtime": False, "fakecpu_kernels": True}


CONFLICT = """
import contextlib, io, json, logging
from hallm.entrypoints.cli import main
from hallm.platforms.registry import select_platform
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("hallm.platforms").addHandler(handler)
errors, auto = {}, None
for device in ("dup", "auto"):
    try:
        auto = select_platform(device, probe_timeout=5).device_id
    except Exception as exc:
        errors[device] = [type(exc).__name__, str(exc)]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["plugins", "--json"])
fakecpu = select_platform("fakecpu").device_id
report = json.loads(out.getvalue())
print(json.dumps({"errors": errors, "auto": auto, "warnings": warnings, "rc": rc, "report": report, "fakecpu": fakecpu}))
"""


def test_two_distributions_claiming_one_id_is_an_error_naming_both(
    conflict_site: Path, run_py: Any, parse_last_json: Callable[..., Any]
) -> None:
    result = parse_last_json(run_py(conflict_site, "-c", CONFLICT))
    kind, message = result["errors"]["dup"]  # naming the id is an error
    assert kind == "PluginConflictError"
    assert "device id 'dup'" in message
    assert "hallm-dup-a 1.0" in message and "vendor-dup-b 1.0" in message
    # --device auto disables the conflicting id with a warning and chooses among the others.
    assert "auto" not in result["errors"] and result["auto"] == "fakecpu"
    assert any(
        "--device auto ignores device id 'dup'" in w and "vendor-dup-b 1.0" in w for w in result["warnings"]
    )
    assert result["rc"] == 0  # the listing shows the conflict, it does not crash
    dup_rows = [r for r in result["report"]["plugins"] if r["name"] == "dup"]
    assert sorted(r["distribution"] for r in dup_rows) == ["hallm-dup-a", "vendor-dup-b"]
    assert all(r["error"].startswith("PluginConflictError") for r in dup_rows)
    assert result["report"]["auto_choice"] == "fakecpu"
    assert result["fakecpu"] == "fakecpu"  # other ids are unaffected


# ---- in process: argument handling and error reporting ---------------------------------------


def test_user_errors_print_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(probe_timeout: float) -> None:
        raise DeviceSelectionError("unknown device 'x': install it")

    monkeypatch.setattr(registry, "plugin_report", fail)
    assert main(["plugins"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: unknown device 'x': install it\n"
    assert "Traceback" not in captured.err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plugins", "--probe-timeout", "0"])
    assert exc.value.code == 2
    assert "expected a number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "70000"])
    assert exc.value.code == 2
    assert "expected a port in 0-65535, got '70000'" in capsys.readouterr().err


def test_device_arg_defaults_to_none_and_documents_the_fallback_order() -> None:
    parser = argparse.ArgumentParser()
    add_device_arg(parser)
    assert parser.parse_args([]).device is None
    assert parser.parse_args(["--device", "cuda"]).device == "cuda"
    help_text = parser.format_help()
    assert "HALLM_DEVICE" in help_text and "auto" in help_text


def test_every_listed_subcommand_registers_a_handler() -> None:
    parser = cli.build_parser()
    for name in cli.SUBCOMMANDS:
        module = importlib.import_module(f"hallm.entrypoints.cli.{name}")
        assert callable(module.register)
    assert callable(parser.parse_args(["plugins"]).handler)
