"""The kit's parts, in process: xfails files, outcomes, the report, the diagnoses, the CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hallm.conformance import outcomes as oc
from hallm.conformance.diagnose import explain_cache, fit_scale, gqa_mapping
from hallm.conformance.hooks import DEVICE_ERROR
from hallm.conformance.report import build_report, markdown, run_passed, summarize
from hallm.conformance.xfails import XfailsFileError, find_entry, parse_xfails
from hallm.ops.reference import dense_causal_attention, paged_attention, write_kv
from hallm.ops.testing import expected_attention, make_paged_batch
from hallm.platforms import FEATURE_SINKS, AttentionBackend


def test_xfails_patterns_treat_brackets_literally_and_need_a_reason() -> None:
    entries = parse_xfails(
        "# comment\n\n"
        "test_l1_attention.py::test_paged_attention[*-long_context]  tiling overflow (acme#12)\n"
        "test_gqa_head_mapping[acme-float16-8q?kv]\tfp16 accumulation (acme#13)\n",
        "x.txt",
    )
    assert [e.source for e in entries] == ["x.txt:3", "x.txt:4"]
    assert find_entry(
        entries, "test_l1_attention.py::test_paged_attention[a-float32-h64-b16-kvauto-long_context]"
    )
    assert not find_entry(
        entries, "test_l1_attention.py::test_paged_attention[a-float32-h64-b16-kvauto-mixed]"
    )
    assert find_entry(entries, "test_l1_faults.py::test_gqa_head_mapping[acme-float16-8q2kv]")  # name part
    assert not find_entry(entries, "test_l1_faults.py::test_gqa_head_mapping[acme-float16-8q2xkv]")
    assert entries[0].matched == 1 and entries[1].matched == 1
    with pytest.raises(XfailsFileError, match=r"x\.txt:1: entry 'test_foo' has no reason"):
        parse_xfails("test_foo\n", "x.txt")


def test_outcomes_and_exit_rule() -> None:
    assert oc.classify_skip("Skipped: not applicable: no fp16") == oc.NOT_APPLICABLE
    assert oc.classify_skip("aborted: device error") == oc.ABORTED
    assert oc.classify_skip("device cuda is not available here") == oc.ENV_SKIP
    assert oc.worse(oc.PASS, oc.FAIL) == oc.FAIL and oc.worse(oc.XFAIL, oc.NOT_APPLICABLE) == oc.XFAIL

    def rec(outcome: str, dtype: str | None = "float32") -> oc.TestRecord:
        return oc.TestRecord(f"t.py::t[{outcome}]", "L1 paged attention", 1, dtype, outcome, "why\nmore")

    fine = [rec(oc.PASS), rec(oc.XFAIL), rec(oc.NOT_APPLICABLE, "float16"), rec(oc.ENV_SKIP, None)]
    assert run_passed(fine)
    for bad in (oc.FAIL, oc.UNEXPECTED_PASS, oc.ABORTED):
        assert not run_passed([*fine, rec(bad)])
    assert summarize(fine)[oc.PASS] == 1 and sum(summarize(fine).values()) == 4
    report = build_report({"device_id": "x", "level": 1}, [*fine, rec(oc.FAIL)], [])
    text = markdown(report)
    assert "FAILED" in text and "| L1 paged attention | 1/3/3 **✗1** xfail 1 | 0/0/1 | 0/1/1 skip 1 |" in text
    assert "- `t.py::t[fail]`: why" in text


def test_device_error_patterns() -> None:
    assert DEVICE_ERROR.search("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert DEVICE_ERROR.search("torch.AcceleratorError: CUDA error: device-side assert triggered")
    assert DEVICE_ERROR.search("RuntimeError: HIP error: hipErrorIllegalAddress")
    assert not DEVICE_ERROR.search(
        "RuntimeError: Expected all tensors to be on the same device, cuda:0 and cpu"
    )
    assert not DEVICE_ERROR.search("AssertionError: cuda output differs")


def test_pytest_plugin_module_imports_nothing_heavy() -> None:
    """pytest auto-loads it in every session of the environment (entry point pytest11)."""
    code = (
        "import sys, pytest; before = set(sys.modules); import hallm.conformance.plugin; "
        "new = set(sys.modules) - before; bad = [m for m in new if m.split('.')[0] in "
        "('torch', 'numpy', 'transformers', 'pluggy') or m.startswith(('hallm.platforms', 'hallm.core'))]; "
        "print(sorted(bad)); sys.exit(bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_isolates_pytest_and_maps_options(tmp_path: Path) -> None:
    from hallm.entrypoints.cli import build_parser
    from hallm.entrypoints.cli.conformance import build_args

    args = build_parser().parse_args(
        [
            "conformance",
            "--device",
            "acme",
            "--level",
            "1",
            "--xfails",
            "x.txt",
            "--report",
            "r.json",
            "--quick",
            "--",
            "-k",
            "gqa",
        ]
    )
    assert isinstance(args, argparse.Namespace)
    argv = build_args(args, "acme", tmp_path)
    assert argv[:2] == ["-c", str(tmp_path / "pytest.ini")] and (tmp_path / "pytest.ini").exists()
    assert "--hallm-device=acme" in argv and "--hallm-level=1" in argv and "--hallm-quick" in argv
    assert f"--hallm-xfails={Path('x.txt').resolve()}" in argv and argv[-2:] == ["-k", "gqa"]
    proc = subprocess.run(
        [sys.executable, "-m", "hallm.entrypoints.cli", "conformance"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "pass --device ID" in proc.stderr


# ---- the diagnoses on synthetic faults (fast versions of what the broken plugins show) ---------


def _batch(num_heads: int = 8, num_kv_heads: int = 2):  # type: ignore[no-untyped-def]
    return make_paged_batch(
        [7, 1, 5], [0, 20, 9], num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=32, block_size=8
    )


def test_fit_scale_names_the_scale_actually_used() -> None:
    batch = _batch()
    wrong = expected_attention(batch, 1 / 32)
    finding = fit_scale(batch, wrong, 32**-0.5, 1e-3)
    assert finding is not None and "= 1/head_size" in finding
    assert fit_scale(batch, expected_attention(batch, 32**-0.5), 32**-0.5, 1e-3) is None


def test_gqa_mapping_names_the_interleaving() -> None:
    batch = _batch()
    out = torch.zeros(batch.query.shape, dtype=torch.float64)
    qsl = batch.layout.query_start_loc
    for i in range(3):
        lo, hi = int(qsl[i]), int(qsl[i + 1])
        tiled_k = batch.seq_keys[i].repeat(1, 4, 1)  # head h -> KV head h % 2
        tiled_v = batch.seq_values[i].repeat(1, 4, 1)
        out[lo:hi] = dense_causal_attention(batch.query[lo:hi], tiled_k, tiled_v, 32**-0.5)
    finding = gqa_mapping(batch, out, 32**-0.5, 1e-3)
    assert finding is not None and "[0, 1, 0, 1, 0, 1, 0, 1]" in finding and "h % num_kv_heads" in finding


def test_explain_cache_names_a_write_that_ignores_the_slot_mapping() -> None:
    batch = _batch()
    before = batch.kv_cache.clone()
    write_kv(batch.key, batch.value, batch.kv_cache, torch.arange(batch.key.shape[0]))
    (finding, stray) = explain_cache(batch, before, batch.kv_cache, batch.key, batch.value)
    assert "token t went to flat slot t: the write ignores slot_mapping" in finding
    assert "slots changed that no token maps to" in stray
    good = batch.kv_cache.clone()
    good.copy_(before)
    write_kv(batch.key, batch.value, good, torch.from_numpy(batch.layout.slot_mapping))
    assert explain_cache(batch, before, good, batch.key, batch.value) == []


# ---- kit paths the in-tree plugins do not take: a narrower KV-cache dtype, a custom layout ----


class _Fp8Cache(AttentionBackend):
    """Reference attention over an fp8 (e4m3) KV cache; writes through byte views."""

    name = "unit_fp8"
    dtypes = frozenset({"float32", "bfloat16"})
    kv_cache_dtypes = frozenset({"auto", "fp8_e4m3"})

    def forward(self, query, key, value, kv_cache, metadata, out):  # type: ignore[no-untyped-def]
        t = metadata.tensors
        real = t.slot_mapping >= 0
        flat = kv_cache.view(torch.uint8).view(2, -1, *kv_cache.shape[3:])
        for i, src in enumerate((key, value)):
            flat[i].index_copy_(0, t.slot_mapping[real], src[real].to(kv_cache.dtype).view(torch.uint8))
        cache = kv_cache.to(query.dtype)
        s = self.spec
        return paged_attention(
            query,
            cache,
            t.query_start_loc,
            t.seq_lens,
            t.context_lens,
            t.block_tables,
            s.scale,
            s.num_kv_heads,
            out=out,
        )


class _BlocksFirst(AttentionBackend):
    """Reference attention over a [num_blocks, 2, block_size, kv_heads, head_size] cache."""

    name = "unit_blocks_first"

    @classmethod
    def kv_cache_shape(
        cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    def forward(self, query, key, value, kv_cache, metadata, out):  # type: ignore[no-untyped-def]
        t = metadata.tensors
        default = kv_cache.transpose(0, 1).contiguous()
        write_kv(key, value, default, t.slot_mapping)
        kv_cache.copy_(default.transpose(0, 1))
        s = self.spec
        return paged_attention(
            query,
            default,
            t.query_start_loc,
            t.seq_lens,
            t.context_lens,
            t.block_tables,
            s.scale,
            s.num_kv_heads,
            out=out,
        )


@pytest.mark.parametrize("shape", ["mixed", "long_context"])
def test_kernel_checks_with_an_fp8_cache_and_a_custom_layout(shape: str) -> None:
    from hallm.conformance.cases import SHAPES_BY_NAME
    from hallm.conformance.kernels import AttentionCase, check_case, run_case
    from hallm.conformance.target import Target, has_default_layout

    target = Target.load("cpu")
    for case in (
        AttentionCase(_Fp8Cache, "bfloat16", 64, 16, SHAPES_BY_NAME[shape], "fp8_e4m3"),
        AttentionCase(
            _Fp8Cache, "float32", 64, 16, SHAPES_BY_NAME[shape], "fp8_e4m3", prime_through_backend=True
        ),
        AttentionCase(_BlocksFirst, "float32", 64, 16, SHAPES_BY_NAME[shape]),
    ):
        check_case(case, run_case(target, case))
    assert not has_default_layout(_BlocksFirst) and has_default_layout(_Fp8Cache)


def test_cli_without_pytest_names_the_extra_in_one_line() -> None:
    """After a plain `pip install hallm` (no pytest), one line names the extra to install."""
    code = (
        "import sys; sys.modules['pytest'] = None; from hallm.entrypoints.cli import main; "
        "sys.exit(main(['conformance', '--device', 'cpu']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: hallm conformance needs pytest, which a plain `pip install hallm` does not bring: "
        "pip install 'hallm[conformance]'"
    )


# ---- the alternatives: which wrong attention reproduces the output ------------------------------


def _wrong_attention(batch, allowed, scale=32**-0.5, soft_cap=None, source=None):  # type: ignore[no-untyped-def]
    """The output a kernel with mask `allowed(q_pos, k_pos)` (and keys of request source[i]) computes."""
    from hallm.conformance.alternatives import attend

    out = torch.zeros(batch.query.shape, dtype=torch.float64)
    lay = batch.layout
    for i in range(lay.num_reqs):
        lo, hi = int(lay.query_start_loc[i]), int(lay.query_start_loc[i + 1])
        j = source.get(i, i) if source else i
        q_pos = int(lay.context_lens[i]) + torch.arange(hi - lo)[:, None]
        k_pos = torch.arange(batch.seq_keys[j].shape[0])[None, :]
        out[lo:hi] = attend(
            batch.query[lo:hi], batch.seq_keys[j], batch.seq_values[j], scale, allowed(q_pos, k_pos), soft_cap
        )
    return out


@pytest.mark.parametrize(
    ("window", "cap", "allowed", "source", "fragment"),
    [
        (None, None, lambda q, k: k >= 0, None, "no causal mask"),
        (None, None, lambda q, k: k <= q + 1, None, "causal mask shifted by +1"),
        (4, None, lambda q, k: k <= q, None, "sliding window ignored"),
        (4, None, lambda q, k: (k <= q) & (k > q - 5), None, "sliding window one too wide"),
        (None, 1.5, lambda q, k: k <= q, None, "soft cap ignored"),
        (None, None, lambda q, k: (k <= q) & (k < 16), None, "keys past position 16 are dropped"),
        (None, None, lambda q, k: k <= q, {1: 0}, "request 1 read request 0's keys/values"),
    ],
    ids=["non_causal", "shifted", "window_ignored", "window_wide", "cap_ignored", "truncated", "mixed"],
)
def test_alternatives_name_the_wrong_attention(window, cap, allowed, source, fragment) -> None:  # type: ignore[no-untyped-def]
    from hallm.conformance.diagnose import explain_output

    batch = _batch()
    scale = 32**-0.5
    expected = expected_attention(batch, scale, window, cap)
    with_cap = None if fragment == "soft cap ignored" else cap
    wrong = _wrong_attention(batch, allowed, scale, with_cap, source)
    findings = explain_output(batch, wrong, expected, scale, 1e-3, sliding_window=window, logits_soft_cap=cap)
    assert fragment in findings[-1], findings
    assert (
        explain_output(batch, expected, expected, scale, 1e-3, sliding_window=window, logits_soft_cap=cap)
        == []
    )


def test_run_status_and_failure_causes() -> None:
    from hallm.conformance.report import INCOMPLETE, PASSED, failure_causes, run_status

    def rec(name: str, outcome: str, message: str = "", location: str | None = None) -> oc.TestRecord:
        return oc.TestRecord(name, "L1 paged attention", 1, "bfloat16", outcome, message, location=location)

    raised = [
        rec(f"t{i}", oc.FAIL, "NotImplementedError: no bf16", "acme/attn.py:12 (forward)") for i in range(40)
    ]
    diagnosed = rec(
        "d", oc.FAIL, "attention output differs: max error 0.5\n  - wrong requests: 2\n  - wrong scale 0.25"
    )
    causes = failure_causes([*raised, diagnosed, rec("p", oc.PASS)])
    assert causes[0] == (
        "NotImplementedError: no bf16 (raised at acme/attn.py:12 (forward))",
        [f"t{i}" for i in range(40)],
    )
    assert causes[1] == ("wrong scale #", ["d"])
    assert run_status([rec("p", oc.PASS)]) == PASSED
    assert run_status([rec("p", oc.PASS), rec("s", oc.ENV_SKIP, "device absent")]) == INCOMPLETE
    assert run_status([rec("p", oc.PASS)], device_unavailable="no driver") == INCOMPLETE


class _IgnoresSinks(AttentionBackend):
    """Declares sinks and takes the keyword, but attends without them."""

    name = "unit_ignores_sinks"
    features = frozenset({FEATURE_SINKS})

    def forward(self, query, key, value, kv_cache, metadata, out, sinks=None):  # type: ignore[no-untyped-def]
        t = metadata.tensors
        write_kv(key, value, kv_cache, t.slot_mapping)
        s = self.spec
        return paged_attention(
            query, kv_cache, t.query_start_loc, t.seq_lens, t.context_lens, t.block_tables, s.scale, s.num_kv_heads,
            out=out,
        )  # fmt: skip


def test_sinks_case_fails_a_backend_that_ignores_them() -> None:
    from hallm.conformance.cases import SHAPES_BY_NAME, unsupported_specs
    from hallm.conformance.kernels import AttentionCase, check_case, run_case
    from hallm.conformance.target import Target

    target = Target.load("cpu")
    case = AttentionCase(_IgnoresSinks, "float32", 64, 16, SHAPES_BY_NAME["chunked_prefill"], sinks=True)
    with pytest.raises(pytest.fail.Exception, match="WITHOUT the sink logits: `sinks` is ignored"):
        check_case(case, run_case(target, case))
    # A backend that does not declare sinks must refuse a layer that has them.
    assert ("feature-sinks", "feature sinks", {"sinks": True}) in unsupported_specs(_Fp8Cache)
    assert "features ['sinks'] not supported" in _Fp8Cache.validate(case.spec())[-1]
