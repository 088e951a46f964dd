"""The core's executors: `uni` (in process), `mp` (a process per tensor-parallel rank) and `ray`
(Ray actors; imported only when chosen, Ray is an extra)."""

from __future__ import annotations

from hallm.core.executors.mp import MultiprocExecutor
from hallm.core.executors.uni import UniExecutor
from hallm.platforms import Executor

BUILTIN_EXECUTORS: dict[str, type[Executor]] = {"uni": UniExecutor, "mp": MultiprocExecutor}
