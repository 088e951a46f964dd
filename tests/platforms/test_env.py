"""hallm.platforms.env: the declared user settings, and switches read without misreading a value."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from hallm.platforms import SETTINGS, env_flag
from hallm.platforms.env import CPU_NATIVE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("1", True),
        ("TRUE", True),
        (" on ", True),
        ("yes", True),
        ("0", False),
        ("false", False),
        ("Off", False),
        ("no", False),
    ],
)
def test_env_flag_reads_the_common_spellings(monkeypatch, raw: str, want: bool) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CPU_NATIVE, raw)
    assert env_flag(CPU_NATIVE, not want) is want


@pytest.mark.parametrize("default", [True, False])
def test_env_flag_unset_or_empty_is_the_default(monkeypatch, default: bool) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv(CPU_NATIVE, raising=False)
    assert env_flag(CPU_NATIVE, default) is default
    monkeypatch.setenv(CPU_NATIVE, "")
    assert env_flag(CPU_NATIVE, default) is default


def test_env_flag_refuses_what_it_cannot_read_and_names_it_does_not_declare(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CPU_NATIVE, "disabled")
    with pytest.raises(ValueError, match=r"HALLM_CPU_NATIVE='disabled' is not a switch: set it to 1"):
        env_flag(CPU_NATIVE, True)
    with pytest.raises(KeyError, match="HALLM_TRY_THIS is not a hallm setting"):
        env_flag("HALLM_TRY_THIS", True)


def test_every_hallm_variable_in_the_library_is_a_declared_setting_listed_in_the_readme() -> None:
    """No experiment switches: every HALLM_* name in hallm/ and plugins/ is a setting of
    hallm.platforms.env, and the README lists each."""
    files = subprocess.run(
        ["git", "ls-files", "hallm", "plugins"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    used: set[str] = set()
    for name in files:
        if name.endswith((".py", ".md")):  # (C headers have HALLM_*_H include guards)
            used |= set(re.findall(r"\bHALLM_[A-Z0-9_]+", (ROOT / name).read_text(errors="replace")))
    assert used - set(SETTINGS) == set()
    readme = (ROOT / "README.md").read_text()
    assert [s for s in SETTINGS if s not in readme] == []
