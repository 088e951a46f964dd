"""Device selection over fake plugin distributions: explicit, env, auto, errors, hand-off.

One subprocess (selection_scenario.py) runs every step in a fresh process and reports as
JSON; each test below checks one promise of the registry against that report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.platforms import API_VERSION

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def probe_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe_log") / "parent.log"


@pytest.fixture(scope="module")
def scenario(
    mixed_site: Path, run_py: Any, parse_last_json: Callable[..., Any], probe_log: Path
) -> dict[str, Any]:
    proc = run_py(mixed_site, str(HERE / "selection_scenario.py"), env={"FAKE_PROBE_LOG": str(probe_log)})
    result: dict[str, Any] = parse_last_json(proc)
    return result


def test_import_hallm_imports_no_torch_and_no_plugin(scenario: dict[str, Any]) -> None:
    assert not any(scenario["modules_after_import"].values()), scenario["modules_after_import"]


def test_explicit_device_loads_only_that_plugin_despite_broken_ones(scenario: dict[str, Any]) -> None:
    explicit = scenario["explicit"]
    assert explicit["device"] == "fakecpu"
    assert (explicit["distribution"], explicit["version"]) == ("hallm-fakecpu", "0.3.0")
    assert explicit["probe"] == "1 fake CPU"
    assert explicit["registered"] == ["hallm.platforms:fakecpu"]
    assert explicit["modules"] == {
        "fakecpu_plugin": True,
        "fastdev_plugin": False,
        "broken_plugin": False,
        "raiser_plugin": False,
        "fakeext_plugin": False,
    }


def test_loading_twice_changes_nothing(scenario: dict[str, Any]) -> None:
    twice = scenario["twice"]
    assert twice["same_class"]
    assert twice["count_before"] == twice["count_after"] == 1


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("unknown_first_party", "pip install 'hallm[rocm]'"),
        ("unknown_vendor", "install the vendor's plugin distribution that provides device id 'acme9'"),
    ],
)
def test_unknown_device_names_it_the_installed_ids_and_the_install_command(
    scenario: dict[str, Any], key: str, hint: str
) -> None:
    result = scenario[key]
    assert not result["ok"]
    assert result["type"] == "DeviceSelectionError"
    device = "acme9" if key == "unknown_vendor" else "rocm"
    assert f"unknown device '{device}'" in result["message"]
    assert "fakecpu (hallm-fakecpu 0.3.0)" in result["message"]
    assert "fastdev (acme-fastdev 0.1.0)" in result["message"]
    assert hint in result["message"]
    # Broken plugins are named apart, never suggested.
    usable, _, broken = result["message"].partition("installed but failing to load or claimed twice:")
    assert "broken (" not in usable and "future (" not in usable
    assert "broken" in broken and "future" in broken and "typo" in broken


def test_installed_but_unavailable_device_gives_the_probe_reason_and_no_fallback(
    scenario: dict[str, Any],
) -> None:
    result = scenario["unavailable"]
    assert not result["ok"]  # an error, not a choice of fakecpu or fastdev
    assert result["type"] == "DeviceSelectionError"
    assert "device 'offdev' (hallm-offdev 0.1.0) is installed but not usable here" in result["message"]
    assert "no OffDev card found in /dev/offdev*" in result["message"]
    assert "does not fall back" in result["message"]
    assert "hallm.platforms:offdev" not in scenario["registered_after_errors"]  # refused, so unloaded
    # Only plugins that load are suggested instead.
    suggested = result["message"].split("other installed device plugins that load:")[1]
    assert "fakecpu (hallm-fakecpu 0.3.0)" in suggested and "fastdev" in suggested
    for broken in ("broken", "future", "typo", "wrongname"):
        assert f"{broken} (" not in suggested, suggested


def test_explicit_broken_plugin_names_plugin_distribution_and_original_error(
    scenario: dict[str, Any],
) -> None:
    result = scenario["broken"]
    assert result["type"] == "PluginLoadError"
    assert "'broken'" in result["message"] and "hallm-broken" in result["message"]
    assert "No module named 'broken_runtime_that_is_missing'" in result["message"]
    assert result["cause"].startswith("ModuleNotFoundError")


def test_api_major_mismatch_is_refused_with_a_clear_message(scenario: dict[str, Any]) -> None:
    result = scenario["future"]
    assert result["type"] == "PluginAPIVersionError"
    assert result["message"] == (
        f"plugin 'future' (hallm-future 0.1.0) targets hallm plugin API 2.0, this hallm speaks {API_VERSION}; "
        "install a hallm-future release built for API 1.x or upgrade hallm"
    )


def test_misspelled_hook_fails_loudly(scenario: dict[str, Any]) -> None:
    result = scenario["typo"]
    assert result["type"] == "PluginLoadError"
    assert "'typo'" in result["message"] and "hallm-typo" in result["message"]
    assert "hallm_platfrom" in result["message"]
    assert "hallm.platforms:future" not in scenario["registered_after_errors"]
    assert "hallm.platforms:typo" not in scenario["registered_after_errors"]


def test_platform_name_must_equal_the_entry_point_name(scenario: dict[str, Any]) -> None:
    result = scenario["wrongname"]
    assert result["type"] == "PluginLoadError"
    assert (
        "FakePlatform.name is 'othername' but the entry-point name (the device id) is 'wrongname'"
        in result["message"]
    )
    assert "hallm.platforms:wrongname" not in scenario["registered_after_errors"]


def test_newer_minor_api_loads_with_a_warning(scenario: dict[str, Any]) -> None:
    result = scenario["newer"]
    assert result["ok"] and result["value"] == "newer"
    assert any(f"API 1.9, newer than this hallm's {API_VERSION}" in w for w in result["warnings"])


def test_hallm_device_env_is_honoured(scenario: dict[str, Any]) -> None:
    assert scenario["env"] == {"ok": True, "value": "fakecpu"}
    assert scenario["env_overridden"] == {"ok": True, "value": "fastdev"}
    assert scenario["env_unavailable"]["type"] == "DeviceSelectionError"
    assert "no OffDev card" in scenario["env_unavailable"]["message"]


def test_auto_survives_raising_hanging_and_broken_plugins_and_picks_by_priority(
    scenario: dict[str, Any],
) -> None:
    auto = scenario["auto"]
    # raiser/hanger (100) and offdev (90) are unavailable, future (200) fails to load:
    # fastdev (50) beats fakecpu (10) and newer (1).
    assert auto["ok"] and auto["value"] == "fastdev"
    assert auto["seconds"] < 5, "a hanging probe must not block selection beyond the timeout"
    log = "\n".join(auto["log"])
    assert "--device auto chose 'fastdev'" in log
    assert (
        "raiser (hallm-raiser 0.1.0, priority 100): unavailable: probe raised RuntimeError: driver exploded"
        in log
    )
    assert "hanger (hallm-hanger 0.1.0, priority 100): unavailable: probe did not return within 1s" in log
    assert "offdev (hallm-offdev 0.1.0, priority 90): unavailable: no OffDev card" in log
    assert "fakecpu (hallm-fakecpu 0.3.0, priority 10): available, 1 device(s): 1 fake CPU" in log
    assert "broken (hallm-broken 0.1.0): failed to load" in log
    assert "future (hallm-future 0.1.0): failed to load" in log
    # Losers loaded only for probing are unregistered again; earlier explicit loads stay.
    assert "hallm.platforms:fastdev" in auto["registered"]
    assert "hallm.platforms:raiser" not in auto["registered"]
    assert "hallm.platforms:hanger" not in auto["registered"]


def test_a_hanging_probe_is_remembered_and_skipped_by_later_auto_starts(scenario: dict[str, Any]) -> None:
    again = scenario["auto_again"]
    assert again["ok"] and again["value"] == "fastdev"
    assert again["seconds"] < 0.9, "the remembered hanger must not cost its timeout again"
    log = "\n".join(again["log"])
    assert "hanger (hallm-hanger 0.1.0, priority 100): unavailable: not probed: its probe hung" in log
    assert "--device hanger probes it again" in log
    explicit = scenario["hanger_explicit"]  # naming it probes it (and it hangs again)
    assert (
        explicit["type"] == "DeviceSelectionError"
        and "probe did not return within 0.2s" in explicit["message"]
    )


def test_extensions_contribute_and_a_broken_one_is_reported_not_fatal(scenario: dict[str, Any]) -> None:
    contributions = scenario["contributions"]
    assert contributions["attention"] == ["fake_tiny", "fake_sdpa", "ext_attn"]
    assert contributions["executors"] == ["fakeexec"]
    assert contributions["extension_errors"]["badext"][0] == "PluginLoadError"
    assert "badext needs libbadext.so" in contributions["extension_errors"]["badext"][1]
    assert "hallm.plugins:fakeext" in contributions["registered"]


def test_no_device_runtime_is_imported_by_selection(scenario: dict[str, Any]) -> None:
    assert scenario["modules_at_end"] == {"fake_device_runtime": False}


CHILD = """
import json, sys
from hallm.platforms.registry import PlatformChoice, platform_from_choice
data = json.loads(sys.argv[1])
cls = platform_from_choice(data)
again = PlatformChoice.from_dict(json.loads(json.dumps(data)))
try:
    PlatformChoice.from_dict({**data, "version": "9.9"})
    mismatch = None
except Exception as exc:
    mismatch = f"{type(exc).__name__}: {exc}"
print(json.dumps({"name": cls.name, "module": cls.__module__, "roundtrip": again.to_dict() == data, "mismatch": mismatch}))
"""


def test_choice_round_trips_as_plain_data_and_children_do_not_probe(
    scenario: dict[str, Any],
    mixed_site: Path,
    run_py: Any,
    parse_last_json: Callable[..., Any],
    probe_log: Path,
    tmp_path: Path,
) -> None:
    data = scenario["choice"]
    assert data == {
        "device_id": "fakecpu",
        "distribution": "hallm-fakecpu",
        "version": "0.3.0",
        "api_version": "1.0",
        "probe": {"available": True, "reason": "1 fake CPU", "device_count": 1},
    }
    assert "fakecpu probed" in probe_log.read_text()  # the parent did probe
    child_log = tmp_path / "child.log"
    child = parse_last_json(
        run_py(mixed_site, "-c", CHILD, json.dumps(data), env={"FAKE_PROBE_LOG": str(child_log)})
    )
    assert child["name"] == "fakecpu" and child["module"] == "fakecpu_plugin"
    assert child["roundtrip"]
    assert not child_log.exists(), "a child process must not probe again"
    assert child["mismatch"].startswith("DeviceSelectionError: the parent process chose device 'fakecpu'")
