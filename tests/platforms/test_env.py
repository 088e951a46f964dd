"""hallm.platforms.env: switches and counts from the environment, with errors for values it would misread."""

from __future__ import annotations

import pytest

from hallm.platforms import env_flag, env_int


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
    monkeypatch.setenv("HALLM_TEST_FLAG", raw)
    assert env_flag("HALLM_TEST_FLAG", not want) is want


@pytest.mark.parametrize("default", [True, False])
def test_env_flag_unset_or_empty_is_the_default(monkeypatch, default: bool) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("HALLM_TEST_FLAG", raising=False)
    assert env_flag("HALLM_TEST_FLAG", default) is default
    monkeypatch.setenv("HALLM_TEST_FLAG", "")
    assert env_flag("HALLM_TEST_FLAG", default) is default


def test_env_flag_refuses_what_it_cannot_read(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HALLM_TEST_FLAG", "disabled")
    with pytest.raises(ValueError, match=r"HALLM_TEST_FLAG='disabled' is not a switch: set it to 1"):
        env_flag("HALLM_TEST_FLAG", True)


def test_env_int(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("HALLM_TEST_INT", raising=False)
    assert env_int("HALLM_TEST_INT", 16) == 16
    monkeypatch.setenv("HALLM_TEST_INT", " 8 ")
    assert env_int("HALLM_TEST_INT", 16) == 8
    for bad in ("eight", "-1", "1.5"):
        monkeypatch.setenv("HALLM_TEST_INT", bad)
        with pytest.raises(ValueError, match=r"HALLM_TEST_INT=.* must be an integer >= 0"):
            env_int("HALLM_TEST_INT", 16)


def test_a_misspelled_cuda_switch_stops_the_swap_with_a_clear_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """HALLM_CUDA_FUSED=false used to mean "on" (anything but "0" did)."""
    fused = pytest.importorskip("hallm_cuda.fused")
    from torch import nn

    monkeypatch.setenv("HALLM_CUDA_FUSED", "false")
    model = nn.Sequential(nn.Linear(4, 4))
    assert fused.fuse_layers(model) is model  # off: nothing swapped
    assert type(model[0]) is nn.Linear
    monkeypatch.setenv("HALLM_CUDA_FUSED", "nope")
    with pytest.raises(ValueError, match="HALLM_CUDA_FUSED='nope'"):
        fused.fuse_layers(model)
