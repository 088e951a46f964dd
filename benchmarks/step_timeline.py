"""The engine's step timeline from a `hallm --log-level debug` log: when requests arrived, how full
each step was, how long steps took, offline and served side by side.

At debug level `LLMEngine` logs a line per request added and per step scheduled, stamped with
`time.perf_counter()` (one clock for every process on a Linux host):

    add t=12.345678 id=... prompt=1024
    step t=12.346001 tokens=8192 prompt=8192 rows=8 waiting=248

`prompt` counts the tokens of rows that run more than one token (prompt chunks); a step with
prompt=0 is a decode step. A step's period is the time to the next step's scheduling: with async
scheduling the engine schedules step N+1 while step N runs on the device, so the period is
the device's step time unless the host is late.

    python benchmarks/step_timeline.py OFFLINE.log SERVED.log --num-requests 256
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import statistics
from typing import Any

_ADD = re.compile(r"\badd t=([0-9.]+) id=\S+ prompt=(\d+)")
_STEP = re.compile(r"\bstep t=([0-9.]+) tokens=(\d+) prompt=(\d+) rows=(\d+) waiting=(\d+)")


@dataclasses.dataclass(frozen=True)
class Step:
    t: float
    tokens: int
    prompt: int
    rows: int
    waiting: int


@dataclasses.dataclass
class Timeline:
    adds: list[float]
    steps: list[Step]


def parse(text: str) -> Timeline:
    adds = [float(m.group(1)) for m in _ADD.finditer(text)]
    steps = [Step(float(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in _STEP.finditer(text)]
    return Timeline(adds, steps)


def last_run(tl: Timeline, num_requests: int) -> Timeline:
    """The last `num_requests` requests added and every step from the first of them on."""
    if len(tl.adds) < num_requests:
        raise ValueError(f"the log holds {len(tl.adds)} added requests, fewer than {num_requests}")
    adds = tl.adds[-num_requests:]
    return Timeline(adds, [s for s in tl.steps if s.t >= adds[0]])


def summarize(tl: Timeline) -> dict[str, Any]:
    """Times are seconds from the first request's arrival."""
    if not tl.adds or len(tl.steps) < 2:
        raise ValueError("the timeline needs added requests and at least two steps")
    t0 = tl.adds[0]
    steps = tl.steps
    periods = [b.t - a.t for a, b in itertools.pairwise(steps)]
    timed = steps[:-1]  # the last step has no successor to end its period
    prompt = [(s, p) for s, p in zip(timed, periods, strict=True) if s.prompt]
    decode = [(s, p) for s, p in zip(timed, periods, strict=True) if not s.prompt]
    arrived = tl.adds[-1]
    during_arrival = [s for s in steps if s.t <= arrived]
    return {
        "requests": len(tl.adds),
        "arrival_s": arrived - t0,
        "first_step_s": steps[0].t - t0,
        "last_step_s": steps[-1].t - t0,
        "steps": len(steps),
        "steps_during_arrival": len(during_arrival),
        "tokens_per_step_during_arrival": statistics.fmean(s.tokens for s in during_arrival)
        if during_arrival
        else 0.0,
        "prompt_steps": len(prompt),
        "prompt_steps_s": sum(p for _, p in prompt),
        "prompt_tokens_per_prompt_step": statistics.fmean(s.prompt for s, _ in prompt) if prompt else 0.0,
        "last_prompt_step_s": max((s.t for s, _ in prompt), default=t0) - t0,
        "decode_steps": len(decode),
        "decode_steps_s": sum(p for _, p in decode),
        "decode_period_ms_p50": 1e3 * statistics.median(p for _, p in decode) if decode else 0.0,
        "decode_rows_p50": statistics.median(s.rows for s, _ in decode) if decode else 0,
        "longest_gap_ms": 1e3 * max(periods),
        # (s after the first arrival, period ms, tokens, rows) of the five longest steps
        "longest_steps": [
            (s.t - t0, 1e3 * p, s.tokens, s.rows)
            for s, p in sorted(zip(timed, periods, strict=True), key=lambda sp: -sp[1])[:5]
        ],
    }


_ROWS = (
    ("requests", "requests", "{:.0f}"),
    ("arrival_s", "last request added (s after the first)", "{:.3f}"),
    ("first_step_s", "first step scheduled (s)", "{:.3f}"),
    ("steps_during_arrival", "steps scheduled while requests arrived", "{:.0f}"),
    ("tokens_per_step_during_arrival", "  their mean tokens", "{:.0f}"),
    ("prompt_steps", "steps with prompt tokens", "{:.0f}"),
    ("prompt_steps_s", "  their time (s)", "{:.3f}"),
    ("prompt_tokens_per_prompt_step", "  their mean prompt tokens", "{:.0f}"),
    ("last_prompt_step_s", "last step with prompt tokens (s)", "{:.3f}"),
    ("decode_steps", "decode-only steps", "{:.0f}"),
    ("decode_steps_s", "  their time (s)", "{:.3f}"),
    ("decode_period_ms_p50", "  period p50 (ms)", "{:.2f}"),
    ("decode_rows_p50", "  rows p50", "{:.0f}"),
    ("longest_gap_ms", "longest step period (ms)", "{:.2f}"),
    ("last_step_s", "last step scheduled (s)", "{:.3f}"),
)


def table(summaries: dict[str, dict[str, Any]]) -> str:
    """The summaries side by side, one column each."""
    names = list(summaries)
    lines = [f"{'':42s}" + "".join(f"{n:>12s}" for n in names)]
    for key, label, fmt in _ROWS:
        lines.append(f"{label:42s}" + "".join(f"{fmt.format(summaries[n][key]):>12s}" for n in names))
    for n in names:
        steps = ", ".join(
            f"{ms:.1f} ms at {t:.3f} s ({tok} tokens, {rows} rows)"
            for t, ms, tok, rows in summaries[n]["longest_steps"]
        )
        lines.append(f"longest steps, {n}: {steps}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="logs of `hallm --log-level debug ...` runs")
    p.add_argument("--num-requests", type=int, required=True, help="requests of the run to read (the last)")
    args = p.parse_args()
    with_names = {}
    for path in args.logs:
        with open(path, errors="replace") as f:
            with_names[path] = summarize(last_run(parse(f.read()), args.num_requests))
    print(table(with_names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
