"""Triton kernel tests run in Triton's interpreter (no GPU in CI).

TRITON_INTERPRET must be set before triton is first imported: triton decorates its own
standard-library kernels (tl.cdiv, tl.max, ...) for one mode at import. This conftest sets it
while the directory is collected; `make test` / CI should also export TRITON_INTERPRET=1, so that
no earlier import of triton (by another test module) can pin the compiled mode. Compile-only
checks (test_triton_compile.py) run in a subprocess with the interpreter off.
"""

from __future__ import annotations

import os
import sys

import pytest

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _interpreter_active(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly (not with a confusing kernel error) if triton was imported in compiled mode."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.cdiv, InterpretedFunction):
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its standard library is in "
            "compiled mode; run the tests with TRITON_INTERPRET=1 in the environment"
        )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
