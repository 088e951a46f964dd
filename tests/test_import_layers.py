"""The import layers of the architecture map, checked on the source: the contracts import nothing
of the engine, the engine reaches device code only through the contracts (its one import of
hallm.ops is the device-neutral reference op table, the default where no plugin provides an op),
and a plugin imports only the public plugin API: hallm.platforms, hallm.ops (portable kernels)
and hallm.worker_api (for a plugin that brings its own worker)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_API = ("hallm.platforms", "hallm.ops", "hallm.worker_api")


def _hallm_imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "hallm" or name.startswith("hallm."):
                yield node.lineno, name


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(files: list[Path], allowed: tuple[str, ...]) -> list[str]:
    return [
        f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}:{line} imports {name}"
        for f in files
        for line, name in _hallm_imports(f)
        if not _under(name, allowed)
    ]


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("hallm/platforms", ("hallm.platforms",)),
        ("hallm/ops", ("hallm.ops", "hallm.platforms")),
        ("hallm/core", ("hallm.core", "hallm.platforms", "hallm.ops.reference_ops")),
    ],
)  # fmt: skip
def test_core_layers(package: str, allowed: tuple[str, ...]) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    assert _violations(files, allowed) == []


def test_plugins_import_only_the_plugin_api() -> None:
    files = sorted(f for f in (ROOT / "plugins").rglob("*.py") if f.parent.name.startswith("hallm_"))
    files += sorted((ROOT / "examples" / "plugin-template").rglob("*.py"))
    assert len(files) > 20
    assert _violations([f for f in files if "/tests/" not in str(f)], PLUGIN_API) == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom hallm.platforms import Platform\nfrom hallm.core.scheduler import Scheduler\n"
    )
    assert _violations([bad], PLUGIN_API) == [f"{bad}:3 imports hallm.core.scheduler"]
