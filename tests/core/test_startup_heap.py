"""freeze_startup_heap: start-up objects leave the cycle collector's passes, later ones do not.
Run in a child process: freezing is for the whole life of a process."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc
from hallm.core.startup_heap import freeze_startup_heap
class Node:
    pass
early = [Node() for _ in range(1000)]
frozen = freeze_startup_heap()
assert frozen >= 1000, frozen
late = Node()
late.self = late           # a cycle made after the freeze
del late
assert gc.collect() >= 1   # is still collected
assert gc.get_freeze_count() == frozen
print("ok")
"""


def test_freeze_startup_heap_in_a_child_process() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
