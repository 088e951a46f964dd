"""`compile_check` over several processes (`python -m hallm.ops.triton.compile_check --jobs N`):
Triton's pipeline runs on one core, so the variants are dealt round-robin over spawned workers."""

from __future__ import annotations

import dataclasses
from typing import Any

from hallm.ops.triton.compile_check import CI_SUBSET, compile_target, compile_variants, variants
from hallm.ops.triton.target import AMD_ARCHS


def _compile_group(arch: int | str, names: list[str]) -> list[dict[str, Any]]:
    """One worker's share of a parallel compile check: `names`' variants for `arch`, as dicts."""
    return [dataclasses.asdict(r) for r in compile_variants(arch, only=names)]


def compile_parallel(archs: list[int | str], ci: bool, jobs: int) -> list[dict[str, Any]]:
    """Every variant (or the CI subset) for each of `archs`, compiled by `jobs` processes: Triton's
    pipeline runs on one core, so the variants are dealt round-robin into `jobs` groups per
    architecture. Results in each architecture's variant order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    groups = []
    for arch in archs:
        names = [v[0] for v in variants(target=compile_target(arch))]
        if ci:
            names = [n for n in names if n in CI_SUBSET]
        groups += [(arch, names[i::jobs]) for i in range(min(jobs, len(names)))]
    # spawn: a fresh interpreter per worker (a forked Triton/torch process is not safe to reuse)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_compile_group, *zip(*groups, strict=True)))
    order = {(arch, v[0]): i for arch in archs for i, v in enumerate(variants(target=compile_target(arch)))}
    rows = [row for part in parts for row in part]
    return sorted(
        rows, key=lambda r: (archs.index(_arch_of(r["target"])), order[_arch_of(r["target"]), r["name"]])
    )


def _arch_of(target: str) -> int | str:
    """The architecture argument of a result's target ("cuda:90" -> 90, "hip:gfx942" -> "gfx942")."""
    arch = target.split(":", 1)[1]
    return arch if arch in AMD_ARCHS else int(arch)
