"""Probes run in isolation: exceptions, hangs and bad answers are reported, never raised."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from hallm.platforms import Capabilities, Platform, Probe
from hallm.platforms.probing import choose_auto, run_probe, run_probes


def make_platform(device_id: str, probe_fn: Any) -> type[Platform]:
    class P(Platform):
        name = device_id
        device_type = "cpu"
        api_version = "1.0"

        @classmethod
        def probe(cls) -> Probe:
            result: Probe = probe_fn()
            return result

        def capabilities(self) -> Capabilities:
            return Capabilities(dtypes=("float32",))

        def attention_backends(self) -> Sequence[Any]:
            return []

        def memory_info(self, device_index: int = 0) -> tuple[int, int]:
            return (0, 0)

    return P


def _raise() -> Probe:
    raise OSError("libfoo.so: cannot open shared object file")


def test_a_raising_probe_is_reported_as_unavailable() -> None:
    probe = run_probe(make_platform("r", _raise), timeout=5)
    assert probe == Probe(False, "probe raised OSError: libfoo.so: cannot open shared object file")


def test_a_wrong_answer_is_reported_as_unavailable() -> None:
    probe = run_probe(make_platform("w", lambda: True), timeout=5)
    assert not probe.available and "probe returned bool, not a hallm.platforms.Probe" in probe.reason


def test_hanging_probes_share_one_deadline_and_do_not_block_the_others() -> None:
    platforms = {
        "slow1": make_platform("slow1", lambda: time.sleep(30)),
        "slow2": make_platform("slow2", lambda: time.sleep(30)),
        "ok": make_platform("ok", lambda: Probe(True, "fine", 2)),
    }
    start = time.monotonic()
    probes = run_probes(platforms, timeout=0.3)
    assert time.monotonic() - start < 1.5  # one deadline for all, not 0.3 s per probe
    assert probes["ok"] == Probe(True, "fine", 2)
    assert probes["slow1"] == probes["slow2"] == Probe(False, "probe did not return within 0.3s")


def test_auto_choice_prefers_priority_then_id() -> None:
    assert choose_auto({}) is None
    assert choose_auto({"cpu": 10, "cuda": 100, "acme": 100}) == "acme"
    assert choose_auto({"cpu": 10, "cuda": 100}) == "cuda"
