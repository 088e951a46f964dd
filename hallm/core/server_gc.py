"""The cycle collector in a process hallm owns for its whole life (the engine process, the API
process of `hallm serve`): off the start-up heap, and off the per-step path.

Such a process holds hundreds of thousands of long-lived objects once started (imported modules,
the model, the tokenizer, the KV block pool), and every request adds its own (a prompt's id list,
the engine's sequence, the API process's coroutines and buffers). Two things make the
interpreter's default collector stall it under load:

- A full (oldest-generation) collection walks every live object. `gc.freeze()` after start-up
  moves the start-up heap into the permanent generation, which collections skip.
- The youngest generation is collected whenever allocations outnumber deallocations by 700 (in
  CPython before 3.14). One serving step allocates more than that before it frees it (a step's
  deltas and output objects, the API process's chunks for a few hundred streams), so a young
  collection ran on nearly every step and, while a burst of requests grew the heap, a full one
  every hundred young ones (`benchmarks/server_gc.py`, `benchmarks/api_process.py`). `YOUNG_THRESHOLD` puts a step's transient objects under the
  trigger; unreachable cycles are still collected, after more allocations.

Not for the offline `LLM`: it lives in the user's process, whose heap and collector are the user's.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("hallm.server_gc")

#: Net new container objects that trigger a young collection (CPython's default: 700 before 3.14).
YOUNG_THRESHOLD = 50_000


def prepare_server_gc() -> int:
    """Collect what start-up left behind, freeze every object still alive, and raise the young
    generation's threshold to `YOUNG_THRESHOLD` (the older generations' stay); returns how many
    objects are frozen."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    frozen = gc.get_freeze_count()
    logger.debug(
        "froze %d start-up objects out of the cycle collector's passes; young collections every %d "
        "net allocations",
        frozen,
        YOUNG_THRESHOLD,
    )
    return frozen
