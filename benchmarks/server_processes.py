"""The processes of a running `hallm serve`, from outside: their CPU time (from /proc) and py-spy
recordings of the API process and the engine process (its busiest child), for gpu_served.py."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def server_cpu(server_pid: int, engine_pid: int | None = None) -> dict[str, float]:
    """CPU seconds of the API processes (the server's process and its children other than the
    engine process: `--api-server-count` > 1 runs more) and of the engine process (`engine_pid`,
    else the busiest child); empty where /proc cannot say."""
    try:
        kids = {c: cpu_seconds(c) for c in children(server_pid)}
        api = cpu_seconds(server_pid)
    except (OSError, ValueError, IndexError):
        return {}
    if engine_pid is None or engine_pid not in kids:
        engine_pid = max(kids, key=lambda c: kids[c], default=None)
    engine = kids.pop(engine_pid, 0.0) if engine_pid is not None else 0.0
    return {"api": api + sum(kids.values()), "engine": engine}


def engine_pid_in_log(path: Path) -> int | None:
    """The engine process's pid, from the server log's "engine process started (pid N)" line."""
    import re

    match = re.search(r"engine process started \(pid (\d+)\)", path.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def py_spy_binary() -> str:
    for d in [*os.environ.get("PATH", "").split(os.pathsep), *(os.path.join(p, "bin") for p in sys.path)]:
        path = os.path.join(d, "py-spy")
        if d and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no py-spy executable on PATH or in a sys.path bin/ (pip install py-spy)")


def start_py_spy(
    server_pid: int, tmp: Path, engine_pid: int | None = None
) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
    """py-spy recording the (first) API process and the engine process (`engine_pid`, else its
    busiest child), raw format."""
    exe = py_spy_binary()
    if engine_pid is None:
        kids = {c: cpu_seconds(c) for c in children(server_pid)}
        engine_pid = max(kids, key=lambda c: kids[c])
    pids = {"api": server_pid, "engine": engine_pid}
    spies = {}
    for name, pid in pids.items():
        raw = tmp / f"pyspy-{name}.raw"
        cmd = [exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw"]
        cmd += ["--output", str(raw)]
        spies[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
    time.sleep(1.0)  # attached before the run starts
    return spies


def stop_py_spy(spies: dict[str, tuple[subprocess.Popen[bytes], Path]], out: Path) -> None:
    """Stop the recorders (SIGINT: py-spy writes what it has) and summarize each to OUT."""
    for name, (proc, raw) in spies.items():
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if raw.exists():
            (out / f"pyspy-{name}.txt").write_text(summarize_py_spy(raw.read_text()))
        else:
            print(f"[py-spy] no samples of the {name} process (ptrace not permitted?)", flush=True)


def summarize_py_spy(raw: str, top: int = 40) -> str:
    """Functions by share of samples from py-spy's raw (collapsed-stack) output: self time, then
    inclusive time."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for f in set(frames):
            incl[f] += int(count)
    lines = [f"{total} samples", "self:"]
    lines += [f"{c / total:7.1%}  {f}" for f, c in own.most_common(top)]
    lines.append("inclusive:")
    lines += [f"{c / total:7.1%}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines) + "\n"
