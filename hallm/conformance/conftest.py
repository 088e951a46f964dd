"""Fixtures of the kit's tests, and their parameters, generated from the device's declarations.

A test says which parameter set it takes with `@pytest.mark.hallm_params(kind)`; the sets come
from `hallm.conformance.cases` and carry the requirement marks that decide applicability.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hallm.conformance.connector_setups import CORE_CONNECTORS
from hallm.conformance.state import kit_state
from hallm.conformance.target import Target
from hallm.platforms.platform import DTYPE_NAMES

# Nothing comes from a hub: the tiny models are built on the fly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARGNAMES = {
    "attention_matrix": ("backend", "dtype", "head_size", "block_size", "kv_cache_dtype", "shape"),
    "backend_dtype": ("backend", "dtype"),
    "default_layout": ("backend", "dtype"),
    "walk": ("backend", "dtype", "block_size"),
    "gqa": ("backend", "dtype", "num_kv_heads"),
    "features": ("backend", "dtype", "feature"),
    "window": ("backend", "dtype"),
    "rejects": ("backend", "dtype", "undeclared"),
    "executor": ("executor", "dtype"),
    "connector": ("connector",),
    "end_to_end": ("arch", "dtype"),
}
FEATURES = {
    "sliding_window": ("sliding_window",),
    "soft_cap": ("soft_cap",),
    "both": ("sliding_window", "soft_cap"),
    "sinks": ("sinks",),
    "sinks_window": ("sinks", "sliding_window"),  # as gpt-oss's sliding layers
}


def _requires(*tokens: str) -> Any:
    return pytest.mark.hallm_requires(*tokens)


def _params(kind: str, target: Target, quick: bool) -> list[Any]:
    from hallm.conformance import cases

    if not target.loaded:  # one placeholder, aborted at setup with the load error
        return [
            pytest.param(
                *([None] * len(ARGNAMES[kind])), marks=_requires("available"), id="plugin-not-loaded"
            )
        ]
    backends = target.backends()
    if kind == "attention_matrix":
        return cases.attention_matrix(backends, quick)
    if kind == "backend_dtype":
        return cases.per_dtype(backends)
    params: list[Any] = []
    if kind == "default_layout":  # tests that write the cache themselves, in the default layout
        for b in backends:
            for dtype in DTYPE_NAMES:
                marks = [*cases.dtype_marks(b.name, dtype), _requires(f"backend:{b.name}:layout:default")]
                params.append(pytest.param(b.name, dtype, marks=marks, id=f"{b.name}-{dtype}"))
    elif kind == "walk":  # the block and offset walks, at every block size the matrix tests
        for b in backends:
            for dtype in DTYPE_NAMES:
                marks = [*cases.dtype_marks(b.name, dtype), _requires(f"backend:{b.name}:layout:default")]
                for block in [*cases.block_sizes(b), *cases.large_block_sizes(b)]:
                    params.append(
                        pytest.param(b.name, dtype, block, marks=marks, id=f"{b.name}-{dtype}-b{block}")
                    )
    elif kind == "gqa":
        for b in backends:
            for dtype in DTYPE_NAMES:
                for kv in (8, 2, 1):
                    params.append(
                        pytest.param(
                            b.name,
                            dtype,
                            kv,
                            marks=cases.dtype_marks(b.name, dtype),
                            id=f"{b.name}-{dtype}-8q{kv}kv",
                        )
                    )
    elif kind == "features":
        for b in backends:
            for dtype in DTYPE_NAMES:
                for feature, needs in FEATURES.items():
                    marks = [
                        *cases.dtype_marks(b.name, dtype),
                        _requires(*(f"backend:{b.name}:feature:{f}" for f in needs)),
                    ]
                    params.append(
                        pytest.param(b.name, dtype, feature, marks=marks, id=f"{b.name}-{dtype}-{feature}")
                    )
    elif kind == "window":
        for b in backends:
            for dtype in DTYPE_NAMES:
                marks = [
                    *cases.dtype_marks(b.name, dtype),
                    _requires(f"backend:{b.name}:feature:sliding_window"),
                ]
                params.append(pytest.param(b.name, dtype, marks=marks, id=f"{b.name}-{dtype}"))
    elif kind == "rejects":
        for b in backends:
            for case_id, _, overrides in cases.unsupported_specs(b):
                rejected = overrides.get("dtype")  # the dtype column for a dtype, else "any"
                params.append(pytest.param(b.name, rejected, case_id, id=f"{b.name}-{case_id}"))
    elif kind == "executor":
        names = ["uni", *sorted(target.contributions("hallm_executors"))]
        for name in names:
            for dtype in DTYPE_NAMES:
                params.append(
                    pytest.param(
                        name, dtype, marks=_requires("available", f"dtype:{dtype}"), id=f"{name}-{dtype}"
                    )
                )
    elif kind == "connector":
        names = sorted(target.contributions("hallm_kv_connectors")) or ["none"]
        params = [pytest.param(n, marks=_requires("available", "kv_connector"), id=n) for n in names]
        # The core's connectors, on every device: their blocks go through host memory, files and
        # sockets, so a device whose tensors do not move to and from the host faithfully fails here.
        params += [
            pytest.param(f"core-{n}", marks=_requires("available"), id=f"core-{n}") for n in CORE_CONNECTORS
        ]
    elif kind == "end_to_end":
        from hallm.conformance.models import ARCHS

        for arch in ARCHS:
            for dtype in DTYPE_NAMES:
                marks = _requires("available", f"dtype:{dtype}", "cpu_reference")
                params.append(pytest.param(arch, dtype, marks=marks, id=f"{arch}-{dtype}"))
    else:
        raise ValueError(f"unknown parameter set {kind!r}")
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    mark = metafunc.definition.get_closest_marker("hallm_params")
    if mark is None:
        return
    state = kit_state(metafunc.config)
    kind = str(mark.args[0])
    metafunc.parametrize(ARGNAMES[kind], _params(kind, state.target(), state.quick))


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Target:
    """The device under test (loaded and probed once per session)."""
    return kit_state(request.config).target()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], str]:
    """`tiny_model(arch, head_size)` -> an HF directory, built once per session per pair."""
    built: dict[tuple[str, int], str] = {}

    def get(arch: str, head_size: int) -> str:
        if (arch, head_size) not in built:
            from hallm.conformance.models import build_tiny_model

            out = tmp_path_factory.mktemp(f"tiny-{arch}-h{head_size}")
            built[arch, head_size] = str(build_tiny_model(arch, Path(out), head_size=head_size))
        return built[arch, head_size]

    return get
