"""Every kernel code path compiles to a cubin for sm_80 (hallm-cuda) and to an hsaco for gfx942
(hallm-rocm, through Triton's HIP backend) without a GPU.

One target per vendor: sm_80 has the smallest shared memory of the NVIDIA targets (99 KB per
block, as sm_86/sm_89), and gfx942 (MI300) is the AMD target users run. sm_90 kernels are compiled and
run by the GPU runs (`tests/gpu/run_all.sh kernels` on an H100/H200), gfx90a is left to
`python -m hallm.ops.triton.compile_check gfx90a`: each target costs this suite ~35 s.

Triton's full pipeline (down to ptxas, shipped in the triton wheel) runs in a subprocess with the
interpreter off (this test session runs triton in interpreter mode; see conftest.py). A kernel
that cannot compile, or that needs more shared memory than an sm_86/sm_89 block may have, fails
here (for AMD: more than a workgroup's 64 KiB of LDS). `python -m hallm.ops.triton.compile_check` compiles every variant (all dtypes, two head
shapes); the GPU script runs that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compile(*archs: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hallm.ops.triton.compile_check",
            "--ci",
            "--json",
            f"--jobs={os.cpu_count() or 1}",
            *archs,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """Both targets in one call: its processes share the variants of both."""
    return _compile("80", "gfx942")


def _check(results: list[dict], arch: str) -> None:
    from hallm.ops.triton.compile_check import CI_SUBSET, shared_memory_limit

    got = {r["name"]: r for r in results if r["target"] == arch}
    assert sorted(got) == sorted(CI_SUBSET)
    for name, r in got.items():
        limit = shared_memory_limit(arch)
        assert 0 <= r["shared"] <= limit, f"{name}: {r['shared']} bytes of shared memory > {limit}"


@pytest.mark.parametrize("arch", ["cuda:80"])
def test_every_ci_variant_compiles(compiled: list[dict], arch: str) -> None:
    _check(compiled, arch)


@pytest.mark.parametrize("arch", ["hip:gfx942"])
def test_every_ci_variant_compiles_for_amd(compiled: list[dict], arch: str) -> None:
    """The kernels hallm-rocm launches (the same variants, no PDL) lower for MI300."""
    _check(compiled, arch)


def test_shared_memory_limits_by_target() -> None:
    from hallm.ops.triton.compile_check import shared_memory_limit

    assert shared_memory_limit("hip:gfx942") == 64 * 1024
    assert shared_memory_limit("cuda:80") == 99 * 1024
