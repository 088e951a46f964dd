"""One tensor-parallel rank: a `Worker` on its device, in the rank's process group.

The same class runs in an `mp` worker process (`python -m hallm.core.executors.rank_worker`,
driven over a ZMQ socket, see `serve`) and as a Ray actor (`hallm.core.executors.ray`).
Every rank runs every step in full (the sharded layers meet in their collectives; every rank
sees the same gathered logits and draws from identically seeded generators, so all ranks sample
the same tokens and keep the same request state); only rank 0's output goes back to the engine,
except for a KV connector's results, which differ by rank (each moves its own shard of the KV
heads): for a step with connector instructions every other rank answers its `KVReport`
(hallm.core.executors.kv_reports), which the engine merges into rank 0's output.

Steps are launched through the runner's async path (`launch`): a step's output is resolved only
after the next step has been launched (or when the engine asks for it at once, or by `flush`),
so the device runs step N+1 while step N's sampled ids travel to the engine. One thread does
both, in order, so resolving a step never races with launching the next.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from typing import Any

logger = logging.getLogger("hallm.rank_worker")

#: Methods of `Worker` the executors call on every rank, in the order of the Executor contract.
WORKER_METHODS = frozenset(
    {"load_model", "available_kv_cache_bytes", "bytes_per_block", "init_kv_cache", "execute", "ping"}
)


class RankWorker:
    def __init__(
        self, config: Any, rank: int, world_size: int, local_rank: int, dist_init_method: str
    ) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.dist_init_method = dist_init_method
        self.worker: Any = None
        #: The launched step whose output is not resolved yet: (step id, handle with `.get()`,
        #: whether it carries KV connector instructions).
        self.pending: tuple[int, Any, bool] | None = None

    def init_device(self) -> None:
        """Bind this process to its device (the platform's `set_device`), then join the group
        over the platform's `dist_backend` (NCCL needs the device bound first)."""
        from hallm.core.distributed import init_tensor_parallel
        from hallm.core.worker import Worker
        from hallm.platforms.registry import platform_from_choice

        platform = platform_from_choice(self.config.device)()
        worker_cls = platform.worker_class() or Worker
        self.worker = worker_cls(self.config, platform, self.local_rank)
        self.worker.init_device()
        init_tensor_parallel(platform.dist_backend, self.rank, self.world_size, self.dist_init_method)

    def call(self, method: str, *args: Any) -> Any:
        if method == "ping":
            return self.rank
        if method not in WORKER_METHODS:
            raise ValueError(f"unknown worker method {method!r}")
        return getattr(self.worker, method)(*args)

    def launch(self, step_id: int, step: Any, resolve_now: bool) -> list[tuple[int, Any]]:
        """Launch step `step_id`, then resolve the step launched before it (and this one too
        when `resolve_now`): the (step id, output) pairs now known, oldest first. Outputs are
        resolved on every rank (their request states stay alike) but rank 0's alone are
        returned; the others return their KV connector reports (see `flush`)."""
        if callable(getattr(self.worker, "execute_async", None)):
            handle = self.worker.execute_async(step)
        else:  # a platform's own worker may run steps only to the end
            from hallm.platforms.executor import FinishedStep

            handle = FinishedStep(self.worker.execute(step))
        done = self.flush()
        self.pending = (step_id, handle, getattr(step, "kv_connector_meta", None) is not None)
        if resolve_now:
            done += self.flush()
        return done

    def flush(self) -> list[tuple[int, Any]]:
        """Resolve the pending step, if any: [(step id, output)] on rank 0; elsewhere
        [(step id, KVReport)] for a step with KV connector instructions, else []."""
        if self.pending is None:
            return []
        (step_id, handle, has_kv), self.pending = self.pending, None
        out = handle.get()
        if self.rank == 0:
            return [(step_id, out)]
        if has_kv:
            from hallm.core.executors.kv_reports import KVReport

            return [(step_id, KVReport.of(out))]
        return []

    def shutdown(self) -> None:
        from hallm.core.distributed import destroy_tensor_parallel

        stop = getattr(self.worker, "shutdown", None)  # optional for a plugin's worker
        if callable(stop):
            stop()
        self.worker = None
        destroy_tensor_parallel()


def _exit_with_parent(parent_pid: int) -> None:
    """End this process when the engine's process is gone (killed, crashed): a worker never
    outlives its engine, even when it is blocked in a collective."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def serve(address: str, rank: int) -> None:
    """The mp worker's loop: the first message is (config, world_size, dist_init_method); then
    each message is a pickled (method, args); every rank replies to setup calls; steps
    (`launch`, `flush`) are answered with one ("ok", (step id, answer)) message per answer of
    `RankWorker.flush` (rank 0's outputs, the other ranks' KV connector reports);
    an error is always replied (with its traceback) and ends the worker."""
    import zmq

    ctx: Any = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"rank{rank}".encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    sock.send(pickle.dumps(("hello", rank)))
    config, world_size, init_method = pickle.loads(sock.recv())
    rw = RankWorker(config, rank, world_size, rank, init_method)
    try:
        rw.init_device()
        sock.send(pickle.dumps(("ok", None)))
        while True:
            method, args = pickle.loads(sock.recv())
            if method == "shutdown":
                rw.shutdown()
                sock.send(pickle.dumps(("ok", None)))
                return
            if method in ("launch", "flush"):
                done = rw.launch(*args) if method == "launch" else rw.flush()
                for reply in done:
                    sock.send(pickle.dumps(("ok", reply), protocol=pickle.HIGHEST_PROTOCOL))
                continue
            sock.send(pickle.dumps(("ok", rw.call(method, *args))))
    except BaseException as e:  # reported to the engine, which ends with it
        detail = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        with contextlib.suppress(Exception):
            sock.send(pickle.dumps(("error", detail)))
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hallm tensor-parallel worker (started by the mp executor)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s rank{ns.rank} %(name)s: %(message)s")
    logging.getLogger("hallm").setLevel(ns.log_level)
    threading.Thread(target=_exit_with_parent, args=(ns.parent_pid,), daemon=True).start()
    try:
        serve(ns.address, ns.rank)
    except BaseException:
        sys.exit(1)
    # The engine waits for its ranks to exit: skip the interpreter's teardown of torch's modules
    # (about a second), as multiprocessing's children do; the worker's own shutdown hook has run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
