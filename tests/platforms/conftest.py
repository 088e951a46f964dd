"""Fake plugin distributions, built on the fly as `<name>-<version>.dist-info` directories.

`importlib.metadata` discovers a dist-info directory on `sys.path` exactly like an installed
wheel, so a subprocess with PYTHONPATH pointing at a "site" directory sees these plugins (and
the venv's real ones, which the tests never depend on). Subprocesses keep each scenario's
process-wide plugin state (pluggy manager, sys.modules) isolated from pytest's own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent


def write_dist(
    site: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]], files: dict[str, str]
) -> None:
    """Write an "installed" distribution: METADATA, entry_points.txt, and its module files."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in names.items()) + "\n"
        for group, names in entry_points.items()
    )
    (info / "entry_points.txt").write_text(eps)
    for rel, source in files.items():
        (site / rel).write_text(textwrap.dedent(source))


def platform_module(
    device_id: str,
    *,
    priority: int = 0,
    probe: str = "return Probe(True, 'ready', 1)",
    api_version: str = "1.0",
    hook: str = "hallm_platform",
    backends: str = "return []",
    preamble: str = "",
) -> str:
    """Source of a platform plugin module (bodies are one indented statement block)."""
    return f"""\
import os, time
from hallm.platforms import Capabilities, Platform, Probe, hookimpl
{preamble}

class FakePlatform(Platform):
    name = {device_id!r}
    device_type = "cpu"
    api_version = {api_version!r}
    auto_priority = {priority}

    @classmethod
    def probe(cls):
        {probe}

    def capabilities(self):
        return Capabilities(dtypes=("float32",))

    def attention_backends(self):
        {backends}

    def memory_info(self, device_index=0):
        return (1 << 30, 1 << 30)


@hookimpl
def {hook}():
    return FakePlatform
"""


FAKECPU_PROBE = """log = os.environ.get("FAKE_PROBE_LOG")
        if log:
            with open(log, "a") as f:
                f.write("fakecpu probed\\n")
        return Probe(True, "1 fake CPU", 1)"""

# The kernels module is what a platform's attention_backends() imports; it must import the
# device runtime only when it computes (forward), never at import.
FAKECPU_KERNELS = """\
from hallm.platforms import AttentionBackend


class FakeTiny(AttentionBackend):
    name = "fake_tiny"
    head_sizes = frozenset({8})

    def forward(self, query, key, value, kv_cache, metadata, out):
        import fake_device_runtime
        return out


class FakeSDPA(AttentionBackend):
    name = "fake_sdpa"

    def forward(self, query, key, value, kv_cache, metadata, out):
        import fake_device_runtime
        return out
"""

FAKEEXT = """\
from hallm.platforms import AttentionBackend, Executor, hookimpl


class ExtAttn(AttentionBackend):
    name = "ext_attn"

    def forward(self, query, key, value, kv_cache, metadata, out):
        return out


class FakeExecutor(Executor):
    name = "fakeexec"
    start = available_kv_cache_bytes = kv_cache_bytes_per_block = None
    init_kv_cache = execute = shutdown = None


@hookimpl
def hallm_attention_backends(platform):
    return [ExtAttn] if platform.name == "fakecpu" else []


@hookimpl
def hallm_executors():
    return {"fakeexec": FakeExecutor}
"""


def add_fakecpu(site: Path) -> None:
    """The working device `fakecpu` (priority 10), its kernels, and a fake device runtime."""
    write_dist(
        site,
        "hallm-fakecpu",
        "0.3.0",
        {"hallm.platforms": {"fakecpu": "fakecpu_plugin"}},
        {
            "fakecpu_plugin.py": platform_module(
                "fakecpu",
                priority=10,
                probe=FAKECPU_PROBE,
                backends="from fakecpu_kernels import FakeSDPA, FakeTiny\n        return [FakeTiny, FakeSDPA]",
            ),
            "fakecpu_kernels.py": FAKECPU_KERNELS,
            "fake_device_runtime.py": "RUNTIME_STARTED = True\n",
        },
    )


def platform_dist(site: Path, dist: str, device_id: str, **kwargs: Any) -> None:
    module = f"{device_id}_plugin"
    write_dist(
        site,
        dist,
        "0.1.0",
        {"hallm.platforms": {device_id: module}},
        {f"{module}.py": platform_module(device_id, **kwargs)},
    )


@pytest.fixture(scope="session")
def mixed_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working, unavailable, raising, hanging, broken, wrong-API and misspelled device plugins."""
    site = tmp_path_factory.mktemp("mixed_site")
    add_fakecpu(site)
    platform_dist(
        site, "acme-fastdev", "fastdev", priority=50, probe="return Probe(True, 'FastDev ready', 2)"
    )
    platform_dist(site, "hallm-raiser", "raiser", priority=100, probe="raise RuntimeError('driver exploded')")
    platform_dist(site, "hallm-hanger", "hanger", priority=100, probe="time.sleep(60)")
    platform_dist(
        site,
        "hallm-offdev",
        "offdev",
        priority=90,
        probe="return Probe(False, 'no OffDev card found in /dev/offdev*')",
    )
    platform_dist(site, "hallm-broken", "broken", preamble="import broken_runtime_that_is_missing")
    platform_dist(site, "hallm-future", "future", priority=200, api_version="2.0")
    platform_dist(site, "hallm-typo", "typo", hook="hallm_platfrom")
    platform_dist(site, "hallm-newer", "newer", priority=1, api_version="1.9")
    write_dist(  # entry point "wrongname", but the Platform class says name = "othername"
        site,
        "hallm-wrongname",
        "0.1.0",
        {"hallm.platforms": {"wrongname": "wrongname_plugin"}},
        {"wrongname_plugin.py": platform_module("othername")},
    )
    write_dist(
        site,
        "hallm-fakeext",
        "0.2.0",
        {"hallm.plugins": {"fakeext": "fakeext_plugin"}},
        {"fakeext_plugin.py": FAKEEXT},
    )
    write_dist(
        site,
        "hallm-badext",
        "0.1.0",
        {"hallm.plugins": {"badext": "badext_plugin"}},
        {"badext_plugin.py": "raise ImportError('badext needs libbadext.so')\n"},
    )
    return site


@pytest.fixture(scope="session")
def conflict_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fakecpu` plus two distributions that both claim device id `dup`."""
    site = tmp_path_factory.mktemp("conflict_site")
    add_fakecpu(site)
    for dist, module in (("hallm-dup-a", "dup_a_plugin"), ("vendor-dup-b", "dup_b_plugin")):
        write_dist(
            site, dist, "1.0", {"hallm.platforms": {"dup": module}}, {f"{module}.py": platform_module("dup")}
        )
    return site


RunPy = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def run_py() -> RunPy:
    """run_py(site, *args, env={...}) -> CompletedProcess: `python *args` with the site on sys.path."""

    def run(
        site: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if k not in ("HALLM_DEVICE", "FAKE_PROBE_LOG")}
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        # A cache of its own per run (hung probes are remembered there across processes), removed after.
        with tempfile.TemporaryDirectory(prefix="hallm-cache-") as cache:
            full_env["HALLM_CACHE_DIR"] = cache
            full_env.update(env or {})
            return subprocess.run(
                [sys.executable, *args],
                capture_output=True,
                text=True,
                env=full_env,
                timeout=timeout,
                check=False,
            )

    return run


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON document a script printed as its last stdout line (fails with its stderr)."""
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def parse_last_json() -> Callable[[subprocess.CompletedProcess[str]], Any]:
    return last_json
