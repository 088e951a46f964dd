"""The `ray` executor: one Ray actor per tensor-parallel rank, on one host or many.

The engine connects to a Ray cluster (`RAY_ADDRESS`, or one started with `ray start` on this
host) or, when there is none, starts a local one and stops it at shutdown. The ranks are placed
by a placement group of `tensor_parallel_size` bundles of one unit of the platform's
`ray_resource` ("GPU", "TPU", "neuron_cores", "CPU"), packed onto as few nodes as the cluster
allows. Each actor runs the same `RankWorker` as an `mp` worker process: Ray restricts the
actor to its assigned accelerator (the platform's visible-devices variable), so the rank binds
local device 0, then joins the group over the platform's `dist_backend` at rank 0's address.

A step is put in Ray's object store once (`ray.put`, shared memory on each node) and every actor
receives the same reference; only rank 0 returns sampled tokens (the others return their KV
connector reports, for steps with connector instructions). A rank whose actor dies or
whose method raises ends the step with a `WorkerDiedError` naming the rank; `shutdown` kills
every actor and removes the placement group, and a Ray instance the executor started is stopped.

Steps follow `ranks`' protocol (async scheduling: a rank launches step N+1, then answers step
N): rank 0's `launch` of step N+1 returns step N's output, and an actor runs its calls one at a
time in the order they were made, so that never races with the launch. The engine reads each
`launch` / `flush` call on every rank, in order, so a dead rank is seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from typing import Any

from hallm.core.executors.mp import free_port
from hallm.core.executors.rank_worker import RankWorker
from hallm.core.executors.ranks import RanksExecutor, WorkerDiedError
from hallm.core.scheduler_output import SchedulerOutput
from hallm.platforms import ConfigError, Platform

logger = logging.getLogger("hallm.executor.ray")

_POLL_S = 0.2


class RayRankActor:
    """The body of one Ray actor: a `RankWorker` bound to the accelerator Ray assigned."""

    def __init__(self) -> None:
        self.rank_worker: RankWorker | None = None

    def address(self) -> tuple[str, int, int]:
        """(node IP, a free port on it, this process's pid): rank 0's is the rendezvous."""
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port("0.0.0.0"), os.getpid()

    def setup(
        self, config: Any, rank: int, world_size: int, dist_init_method: str, resource: str | None
    ) -> None:
        import ray

        from hallm.platforms.registry import platform_from_choice

        platform_cls = platform_from_choice(config.device)
        env = platform_cls.visible_devices_env
        ids = ray.get_runtime_context().get_accelerator_ids().get(resource or "", [])
        if env and ids:
            # Ray sets the variable for the accelerators it knows; set it for the others, so
            # that the assigned device is local device 0 either way.
            os.environ[env] = ",".join(str(i) for i in ids)
        self.rank_worker = RankWorker(config, rank, world_size, 0, dist_init_method)
        self.rank_worker.init_device()

    def call(self, method: str, *args: Any) -> Any:
        assert self.rank_worker is not None, "setup() runs first"
        return self.rank_worker.call(method, *args)

    def launch(self, step_id: int, step: Any, resolve_now: bool) -> list[tuple[int, Any]]:
        assert self.rank_worker is not None, "setup() runs first"
        return self.rank_worker.launch(step_id, step, resolve_now)

    def flush(self) -> list[tuple[int, Any]]:
        assert self.rank_worker is not None, "setup() runs first"
        return self.rank_worker.flush()

    def shutdown(self) -> None:
        if self.rank_worker is not None:
            self.rank_worker.shutdown()
            self.rank_worker = None


class RayExecutor(RanksExecutor):
    name = "ray"
    #: Setup calls (starting actors, loading a model, profiling) may take this long.
    setup_timeout_s: float = 3600.0
    #: How long the placement group may wait for the cluster's resources.
    placement_timeout_s: float = 120.0

    def __init__(self, config: Any, platform: Platform) -> None:
        super().__init__(config, platform)
        self.world_size = int(config.parallel.tensor_parallel_size)
        self.actors: list[Any] = []
        #: Each rank's worker process id (on its node).
        self.pids: list[int] = []
        self._placement_group: Any = None
        self._started_ray = False
        self._dead: str | None = None
        #: Every rank's reference of each `launch` / `flush` call not yet read, oldest first.
        self._calls: deque[list[Any]] = deque()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError:
            raise ConfigError(
                "--distributed-executor-backend ray needs Ray: pip install 'hallm[ray]' "
                "(or use --distributed-executor-backend mp on one host)"
            ) from None

        if not ray.is_initialized():
            # RAY_ADDRESS or a cluster started with `ray start` on this host; else a local one.
            ray.init(logging_level=logging.WARNING, include_dashboard=False)
            self._started_ray = True
        resource = self.platform.ray_resource or "CPU"
        bundles = [{resource: 1.0} for _ in range(self.world_size)]
        self._placement_group = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self._placement_group.ready()], timeout=self.placement_timeout_s)
        if not ready:
            have = ray.cluster_resources().get(resource, 0)
            self.shutdown()
            raise ConfigError(
                f"the Ray cluster cannot place {self.world_size} ranks of one {resource!r} each "
                f"(the cluster has {have:g} {resource!r} in all, some may be in use); lower "
                "--tensor-parallel-size or add nodes to the cluster"
            )
        actor_cls = ray.remote(RayRankActor)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self._placement_group, placement_group_bundle_index=rank
            )
            # The actor takes exactly its bundle (an actor asks for one CPU by default, which a
            # bundle of one GPU does not hold); a dead actor is not restarted: the engine ends.
            options: dict[str, Any] = {"scheduling_strategy": strategy, "max_restarts": 0, "num_cpus": 0}
            if resource == "GPU":
                options["num_gpus"] = 1
            elif resource == "CPU":
                options["num_cpus"] = 1
            else:
                options["resources"] = {resource: 1}
            self.actors.append(actor_cls.options(**options).remote())
        addresses = self._gather([a.address.remote() for a in self.actors], self.setup_timeout_s)
        self.pids = [pid for _, _, pid in addresses]
        ip, port, _ = addresses[0]
        init_method = f"tcp://{ip}:{port}"
        config = self.rank_config()
        self._gather(
            [
                a.setup.remote(config, rank, self.world_size, init_method, resource)
                for rank, a in enumerate(self.actors)
            ],
            self.setup_timeout_s,
        )
        self._call_all("load_model")
        logger.info(
            "ray executor: %d ranks up (pids %s; rendezvous %s)", self.world_size, self.pids, init_method
        )

    def shutdown(self) -> None:
        import ray

        if self.actors and self._dead is None:
            with contextlib.suppress(Exception):
                self._gather([a.shutdown.remote() for a in self.actors], 10)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self._placement_group)
            self._placement_group = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    # ---- the contract ------------------------------------------------------------------------

    def check_health(self) -> None:
        self._check_not_dead()
        started = self._oldest_unanswered()
        if started is not None and time.monotonic() - started > self.step_timeout_s:
            self._fail(f"a step has run for over {self.step_timeout_s:.0f} s: a worker is hung")
        if started is None:
            self._gather([a.call.remote("ping") for a in self.actors], 60)

    # ---- steps -------------------------------------------------------------------------------

    def _send_launch(self, step_id: int, step: SchedulerOutput, resolve_now: bool) -> None:
        import ray

        self._check_not_dead()
        ref = ray.put(step)  # serialized once; every actor reads the same object
        self._calls.append([a.launch.remote(step_id, ref, resolve_now) for a in self.actors])

    def _send_flush(self) -> None:
        self._check_not_dead()
        self._calls.append([a.flush.remote() for a in self.actors])

    def _next_answers(self, deadline: float) -> list[tuple[int, int, Any]]:
        per_rank = self._gather(self._calls.popleft(), deadline - time.monotonic())
        return [(rank, step_id, answer) for rank, done in enumerate(per_rank) for step_id, answer in done]

    # ---- plumbing ----------------------------------------------------------------------------

    def _check_not_dead(self) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    def _fail(self, reason: str) -> None:
        self._dead = reason
        logger.error("ray executor: %s", reason)
        raise WorkerDiedError(reason)

    def _gather(self, refs: list[Any], timeout_s: float) -> list[Any]:
        """Every rank's result, in rank order; the first rank to fail (its actor died, or its
        method raised) ends the wait, so a rank blocked in a collective with a dead peer never
        hangs the engine."""
        import ray
        from ray.exceptions import RayActorError, RayError

        self._check_not_dead()
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except RayActorError:
                    self._fail(self._death(rank))
                except RayError as e:
                    # A rank's collective fails when a peer dies: name the dead peer first.
                    if pending:
                        late, _ = ray.wait(pending, num_returns=len(pending), timeout=1.0)
                        for other in late:
                            try:
                                ray.get(other)
                            except RayActorError:
                                self._fail(self._death(rank_of[other]))
                            except RayError:
                                pass
                    self._fail(f"tensor-parallel worker rank {rank} failed: {e}")
            if pending and time.monotonic() > deadline:
                self._fail(
                    f"no answer from the tensor-parallel workers in {timeout_s:.0f} s: a worker is hung"
                )
        return [results[r] for r in range(len(refs))]

    def _death(self, rank: int) -> str:
        pid = self.pids[rank] if rank < len(self.pids) else "?"
        return f"tensor-parallel worker rank {rank} (Ray actor, pid {pid}) died"

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        return self._gather([a.call.remote(method, *args) for a in self.actors], self.setup_timeout_s)
