"""The core's executors: `uni` (in process). `mp` and `ray` come with tensor parallelism."""

from __future__ import annotations

from hallm.core.executors.uni import UniExecutor
from hallm.platforms import Executor

BUILTIN_EXECUTORS: dict[str, type[Executor]] = {"uni": UniExecutor}
