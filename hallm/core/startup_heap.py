"""Keep the cycle collector off the objects a server process builds at start-up.

A process that hallm owns for its whole life (the engine process, the API process of `hallm
serve`) holds hundreds of thousands of long-lived objects once started: imported modules, the
model and its layers, the tokenizer, the KV block pool. Every full (oldest-generation) collection
walks all of them, and under load such a pass lands between two engine steps as a stall.
`gc.freeze()` after start-up moves them into the permanent generation, which collections skip;
objects made later are collected as before.

Not for the offline `LLM`: it lives in the user's process, whose heap is the user's.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("hallm.startup_heap")


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, then freeze every object still alive; returns how
    many objects are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("froze %d start-up objects out of the cycle collector's passes", frozen)
    return frozen
