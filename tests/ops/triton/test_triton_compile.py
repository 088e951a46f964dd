"""Every kernel code path compiles to a cubin for sm_80 and sm_90 without a GPU.

Triton's full pipeline (down to ptxas, shipped in the triton wheel) runs in a subprocess with the
interpreter off (this test session runs triton in interpreter mode; see conftest.py). A kernel
that cannot compile, or that needs more shared memory than an sm_86/sm_89 block may have, fails
here. `python -m hallm.ops.triton.compile_check` compiles every variant (all dtypes, two head
shapes); the GPU script runs that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "hallm.ops.triton.compile_check", "--ci", "--json", "80", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["cuda:80", "cuda:90"])
def test_every_ci_variant_compiles(compiled: list[dict], arch: str) -> None:
    from hallm.ops.triton.compile_check import CI_SUBSET, SHARED_MEMORY_LIMIT

    got = {r["name"]: r for r in compiled if r["target"] == arch}
    assert sorted(got) == sorted(CI_SUBSET)
    for name, r in got.items():
        assert 0 <= r["shared"] <= SHARED_MEMORY_LIMIT, f"{name}: {r['shared']} bytes of shared memory"
