"""The kit's pytest plugin: its options and markers, and when the kit takes part in a session.

pytest loads this module in every session of an environment where hallm is installed (entry
point `pytest11: hallm.conformance.plugin`), so it imports only the standard library, pytest
and the kit's stdlib-only modules, and every hook is inert unless the kit's own tests are
collected. The device under test, torch and the engine load lazily, from the kit's fixtures.
With plugin autoloading disabled, pass `-p hallm.conformance.plugin`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hallm.conformance.hooks import KitHooks
from hallm.conformance.state import DEVICE_ENV, KIT_DIR, MAX_LEVEL, STATE_KEY, KitState


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hallm-conformance", "hallm conformance kit (pytest --pyargs hallm.conformance)")
    group.addoption("--hallm-device", default=None, metavar="ID", help="device id of the plugin under test")
    group.addoption(
        "--hallm-level",
        type=int,
        default=MAX_LEVEL,
        metavar="N",
        help="run tiers 0..N: 0 discovery, 1 kernels, 2 components, 3 end to end (default 3)",
    )
    group.addoption(
        "--hallm-xfails", default=None, metavar="FILE", help="the vendor's known failures (strict)"
    )
    group.addoption("--hallm-report", default=None, metavar="FILE.json", help="write JSON + Markdown reports")
    group.addoption(
        "--hallm-quick", action="store_true", help="a covering sample of the L1 matrix instead of all of it"
    )
    group.addoption(
        "--hallm-require-device",
        action="store_true",
        help="fail (instead of skipping) the tests that need the device when its probe says unavailable",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hallm_level(n): conformance tier of the test (0..3)")
    config.addinivalue_line("markers", "hallm_group(name): the report row the test belongs to")
    config.addinivalue_line("markers", "hallm_requires(*tokens): capabilities the test needs")
    config.addinivalue_line("markers", "hallm_params(kind): parametrize from the device's declarations")
    state = KitState(config)
    config.stash[STATE_KEY] = state
    config.pluginmanager.register(KitHooks(state), "hallm-conformance-session")
    if _targets_kit(config):
        state.activate()  # a missing --hallm-device is one clear usage error, before collection


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave the kit out of a broad run (`pytest .` in a checkout) that names no device."""
    path = collection_path.resolve()
    inside = path == KIT_DIR or KIT_DIR in path.parents
    if not inside or _targets_kit(config):
        return None
    return not (config.getoption("hallm_device") or os.environ.get(DEVICE_ENV))


def _targets_kit(config: pytest.Config) -> bool:
    """True when the command line names the kit (--pyargs hallm.conformance, or its files)."""
    for arg in config.args:
        name = str(arg).split("::")[0]
        if name == "hallm.conformance" or name.startswith("hallm.conformance."):
            return True
        path = Path(name)
        if path.exists() and (path.resolve() == KIT_DIR or KIT_DIR in path.resolve().parents):
            return True
    return False
