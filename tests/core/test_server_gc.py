"""prepare_server_gc: start-up objects leave the cycle collector's passes, later ones do not; a
step's worth of transient objects triggers no collection, and unreachable cycles are still freed.
Run in a child process: freezing and thresholds hold for the whole life of a process."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc
from hallm.core.server_gc import YOUNG_THRESHOLD, prepare_server_gc

class Node:
    pass

def step(n):
    # a serving step's transient objects: allocated, then all freed by reference counting
    return len([Node() for _ in range(n)])

collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))

step(5_000)  # the interpreter's thresholds: collected on the way
assert collections, "a 5,000-object step should trigger young collections at the default threshold"

early = [Node() for _ in range(1000)]
frozen = prepare_server_gc()
assert frozen >= 1000, frozen
assert gc.get_threshold()[0] == YOUNG_THRESHOLD, gc.get_threshold()

collections.clear()
for _ in range(20):
    step(YOUNG_THRESHOLD // 2)
assert collections == [], collections  # no collection on the per-step path

for _ in range(3 * YOUNG_THRESHOLD // 2):  # unreachable cycles, made after the freeze
    late = Node()
    late.self = late
del late
assert collections, "cycles past the threshold must trigger a young collection"
assert gc.collect() >= 0 and gc.get_freeze_count() == frozen
leftover = [o for o in gc.get_objects() if type(o) is Node and getattr(o, "self", None) is o]
assert len(leftover) == 0, len(leftover)  # every cycle was freed
print("ok")
"""


def test_prepare_server_gc_in_a_child_process() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
