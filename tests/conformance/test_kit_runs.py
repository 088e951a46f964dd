"""The conformance kit, run for real: it passes on the in-tree plugins and on a correct
third-party plugin, and it fails, pointing at the fault, on each deliberately broken one.

Every run is a subprocess over the installed cpu/template plugins or the fake distributions of
`fakes.py` (see conftest.py); the assertions read the kit's JSON report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.conftest import KitRun, KitRunner


def _passes(run: KitRun, levels: int) -> None:
    summary = run.report["summary"]
    assert run.returncode == 0, run.explain()
    assert summary["fail"] == summary["unexpected_pass"] == summary["aborted"] == 0, run.explain()
    ran_levels = {t["level"] for t in run.tests("pass")}
    assert ran_levels == set(range(levels + 1)), f"passing tests only at levels {ran_levels}\n{run.explain()}"


@pytest.mark.parametrize("name", ["cpu", "template"])
def test_kit_passes_on_in_tree_plugins(kit: KitRunner, name: str) -> None:
    """L0-L3 over the CPU plugin (via `hallm conformance`) and the template (via pytest --pyargs)."""
    run = kit.get(name)
    _passes(run, levels=3)
    groups = {t["group"] for t in run.tests("pass")}
    assert {"L1 paged attention", "L2 executor lifecycle", "L3 greedy tokens vs CPU"} <= groups
    # Undeclared float16 is reported as not applicable, never silently dropped.
    assert any(t["dtype"] == "float16" for t in run.tests("not_applicable")), run.explain()
    assert not run.tests("env_skip"), run.tests("env_skip")


def test_kit_passes_on_rocm_kernels_in_the_interpreter(kit: KitRunner) -> None:
    """hallm-rocm's platform, op table (fused MoE and the one-pass sampler included) and attention backend, launching for
    an MI300X (gfx942, 64-wide wavefronts), run L0-L3 in Triton's interpreter: every kernel
    result the kit checks (the whole-engine cases in float32, L3 on the llama: conftest.py)."""
    run = kit.get("rocminterp")
    _passes(run, levels=3)
    groups = {t["group"] for t in run.tests("pass")}
    assert {"L1 paged attention", "L1 op table", "L2 executor lifecycle", "L3 greedy tokens vs CPU"} <= groups
    assert {t["dtype"] for t in run.tests("pass", "test_l1_attention.py")} >= {"float32", "bfloat16"}
    # the Triton fused MoE (the op table's fused_moe) against the reference over routing patterns
    moe = run.tests("pass", "test_l1_ops.py::test_op_matches_its_reference[fused_moe-")
    assert {t["dtype"] for t in moe} == {"float32", "bfloat16"}, run.explain()
    race = run.tests("pass", "test_l1_ops.py::test_temperature_sample_draws_from_the_tempered_softmax")
    assert {t["dtype"] for t in race} == {"float32", "bfloat16"}, run.explain()
    l3 = run.tests("pass", "test_l3_end_to_end.py::test_greedy_matches_cpu")
    assert [t["test_id"].split("[")[1] for t in l3] == ["llama-float32]"], run.explain()
    assert "gfx942" in run.report["device_name"]


def test_report_identifies_the_run_and_has_the_matrix(kit: KitRunner) -> None:
    run = kit.get("cpu")
    report = run.report
    assert report["plugin"]["distribution"] == "hallm-cpu" and report["plugin"]["version"]
    assert report["core_version"] and report["torch_version"] and report["device_name"]
    assert report["passed"] is True and report["quick"] is True and report["level"] == 3
    markdown = Path(report_path(kit, "cpu")).with_suffix(".md").read_text()
    assert "| test group | float32 | bfloat16 | float16 | any |" in markdown
    # Quick: every shape (7) and size pair (6 usual + 4 large) at least once, x the CPU's two
    # backends (native, reference).
    assert "| L1 paged attention | 20/20/20 | 20/20/20 | 0/0/20 |" in markdown
    assert "hallm-cpu 0.1.0" in markdown and report["torch_version"] in markdown


def report_path(kit: KitRunner, name: str) -> Path:
    return kit.workdir / f"{name}.json"


def test_kit_passes_on_a_third_party_plugin_with_a_kv_connector(kit: KitRunner) -> None:
    """A dist-info plugin the core has never seen; its KV connector's round trip is tested, and
    the core's connectors' (shared_storage, offload, p2p) on its device."""
    run = kit.get("fakegood")
    _passes(run, levels=2)
    assert sorted(t["test_id"] for t in run.tests("pass", "test_l2_components.py::test_kv_connector")) == [
        "test_l2_components.py::test_kv_connector_round_trip[core-offload]",
        "test_l2_components.py::test_kv_connector_round_trip[core-p2p]",
        "test_l2_components.py::test_kv_connector_round_trip[core-shared_storage]",
        "test_l2_components.py::test_kv_connector_round_trip[fake_memory]",
    ]


def test_pytest_selection_reports_only_the_selected_tests(kit: KitRunner) -> None:
    """`hallm conformance ... -- -k kv_connector`: the deselected tests are left out of the
    report, not counted as aborted (the run fails on the broken connector alone)."""
    run = kit.get("badconnector")
    assert run.report["summary"]["aborted"] == 0, run.explain()
    assert sorted(t["test_id"] for t in run.tests()) == [
        "test_l2_components.py::test_kv_connector_round_trip[core-offload]",
        "test_l2_components.py::test_kv_connector_round_trip[core-p2p]",
        "test_l2_components.py::test_kv_connector_round_trip[core-shared_storage]",
        "test_l2_components.py::test_kv_connector_round_trip[fake_loads_from_zero]",
    ]


# (kit run, the failing test that must exist, what its message must say)
FAULTS = [
    (
        "badconnector",
        "test_l2_components.py::test_kv_connector_round_trip[fake_loads_from_zero]",
        [
            "KV connector 'fake_loads_from_zero'",
            "the load past a local prefix-cache hit changed block 12",
            "the load must start at num_computed_tokens",
        ],
    ),
    (
        "badscale",
        "test_l1_faults.py::test_softmax_scale",
        ["wrong softmax scale", "= 1/head_size", "not AttentionSpec.scale = 0.3"],
    ),
    (
        "badscale",
        "test_l1_attention.py::test_paged_attention",
        ["wrong softmax scale", "= 1/head_size", "not AttentionSpec.scale = 0.125"],
    ),
    (
        "badwalk",
        "test_l1_faults.py::test_block_table_walk",
        ["read from entry k+1", "off-by-one in the block-table walk", "block 0 is the null block"],
    ),
    (
        "badwalk",
        "test_l1_attention.py::test_paged_attention",
        ["NaN", "read outside the request's sequence", "block-table walk"],
    ),
    (
        "badwrite",
        "test_l1_attention.py::test_paged_attention",
        ["KV cache write is wrong", "token t went to flat slot t: the write ignores slot_mapping"],
    ),
    (
        "badwrite",
        "test_l1_attention.py::test_noncontiguous_inputs",
        ["padding tokens, slot -1, were written"],
    ),
    (
        "badgqa",
        "test_l1_faults.py::test_gqa_head_mapping",
        ["wrong GQA head mapping", "KV head [0, 1, 0, 1, 0, 1, 0, 1]", "h % num_kv_heads"],
    ),
    (
        "eagerimport",
        "test_l0_discovery.py::test_import_loads_no_device_runtime",
        ["device runtime(s) ['torch']", "imported by acme_runtime", "never at module level"],
    ),
    (
        "badpatch",
        "test_l0_discovery.py::test_import_patches_nothing",
        ["monkeypatches: hallm.ops.reference.paged_attention", "hallm_platform()"],
    ),
]


@pytest.mark.parametrize(
    ("name", "test_prefix", "fragments"), FAULTS, ids=[f"{n}-{p.split('::')[1]}" for n, p, _ in FAULTS]
)
def test_kit_fails_pointing_at_the_fault(
    kit: KitRunner, name: str, test_prefix: str, fragments: list[str]
) -> None:
    run = kit.get(name)
    assert run.returncode == 1 and run.report["summary"]["fail"] > 0, run.explain()
    messages = run.messages(test_prefix)
    assert messages, f"no failure of {test_prefix}\n{run.explain()}"
    for fragment in fragments:
        assert fragment in messages, f"{fragment!r} not in:\n{messages[:3000]}"


ISOLATED = [
    ("badgqa", "test_l1_faults.py::test_gqa_head_mapping[fake_wrong_gqa-float32-8q8kv]"),
    ("badgqa", "test_l1_faults.py::test_gqa_head_mapping[fake_wrong_gqa-float32-8q1kv]"),
    ("badgqa", "test_l1_faults.py::test_block_table_walk[fake_wrong_gqa-float32-b16]"),
    ("badscale", "test_l1_faults.py::test_block_table_walk[fake_wrong_scale-float32-b64]"),
    ("badwrite", "test_l1_faults.py::test_block_table_walk[fake_write_ignores_slots-float32-b128]"),
    ("escaped", "test_l1_faults.py::test_block_table_walk[fake_offset_wrong_b64-float32-b32]"),
    ("escaped", "test_l1_attention.py::test_sliding_window_null_blocks[fake_bf16_tiles-bfloat16]"),
    ("escaped", "test_l1_attention.py::test_long_sum_precision[fake_null_blocks_not_masked-bfloat16]"),
    (
        "badwalk",
        "test_l1_attention.py::test_validate_rejects_undeclared[fake_block_walk_off_by_one-kv_cache_dtype-bogus]",
    ),
]


@pytest.mark.parametrize(("name", "healthy"), ISOLATED, ids=[f"{n}-{t.split('::')[1]}" for n, t in ISOLATED])
def test_probes_that_avoid_the_fault_still_pass(kit: KitRunner, name: str, healthy: str) -> None:
    """Each probe isolates one property: a broken backend does not fail the unrelated ones."""
    run = kit.get(name)
    outcomes = {t["test_id"]: t["outcome"] for t in run.report["tests"]}
    assert outcomes.get(healthy) == "pass", run.explain()


def test_device_error_aborts_the_run_instead_of_cascading(kit: KitRunner) -> None:
    run = kit.get("deviceerror")
    summary = run.report["summary"]
    assert run.returncode == 1, run.explain()
    assert summary["fail"] == 1 and summary["aborted"] > 10, run.explain()
    assert "CUDA error: an illegal memory access" in run.report["abort_reason"]
    assert all(t["message"].startswith("not run: device error in") for t in run.tests("aborted"))


def test_strict_xfails_known_failures_and_unexpected_pass(kit: KitRunner) -> None:
    """Every badgqa failure is a known failure; the one wrong entry (a passing test) fails the run."""
    run = kit.get("badgqa-xfails")
    summary = run.report["summary"]
    assert run.returncode == 1, run.explain()
    assert summary["fail"] == 0 and summary["xfail"] > 5, run.explain()
    (unexpected,) = run.tests("unexpected_pass")
    assert unexpected["test_id"] == "test_l1_faults.py::test_gqa_head_mapping[fake_wrong_gqa-float32-8q8kv]"
    assert "WRONG: MHA passes" in unexpected["message"]
    assert all("(fake#1)" in t["message"] for t in run.tests("xfail"))
    assert all(e["matched"] for e in run.report["xfail_entries"])


# ---- the variants that once escaped the kit (issue: "what a vendor actually gets wrong") -------

#: (mutant backend of the `escaped` run, the failing test, what its message must say)
ESCAPED = [
    (
        "fake_bf16_tiles",
        "test_l1_attention.py::test_long_sum_precision",
        ["the error grows with the number of keys", "accumulates in low precision", "8192 keys"],
    ),
    (
        "fake_drops_past_4096",
        "test_l1_attention.py::test_paged_attention",
        ["decode_8k", "keys past position 4096 are dropped"],
    ),
    (
        "fake_offset_wrong_b64",
        "test_l1_faults.py::test_block_table_walk",
        ["block_size=64", "never read offsets 32-63", "read at offset p % 32, not p % block_size"],
    ),
    (
        "fake_null_blocks_not_masked",
        "test_l1_attention.py::test_sliding_window_null_blocks",
        ["NaN", "null block 0, NaN-filled", "masking their scores alone does not stop NaN"],
    ),
    (
        "fake_padding_not_zeroed",
        "test_l1_attention.py::test_paged_attention",
        ["padding rows 26, 27, 28 of `out`", "never written", "must zero the rows of padding tokens"],
    ),
    ("fake_non_causal", "test_l1_attention.py::test_paged_attention", ["no causal mask"]),
    ("fake_window_ignored", "test_l1_attention.py::test_features", ["sliding window ignored"]),
]


@pytest.mark.parametrize(("backend", "test_prefix", "fragments"), ESCAPED, ids=[b for b, _, _ in ESCAPED])
def test_kit_catches_the_variants_that_escaped(
    kit: KitRunner, backend: str, test_prefix: str, fragments: list[str]
) -> None:
    """Each kernel variant fails the kit, with a message naming its cause."""
    run = kit.get("escaped")
    assert run.returncode == 1, run.explain()
    failing = [t for t in run.tests("fail", test_prefix) if f"[{backend}-" in t["test_id"]]
    assert failing, f"no failure of {test_prefix} for {backend}\n{run.explain()}"
    messages = "\n".join(t["message"] for t in failing)
    for fragment in fragments:
        assert fragment in messages, f"{fragment!r} not in:\n{messages[:3000]}"


def test_the_correct_base_of_the_variants_passes_everything(kit: KitRunner) -> None:
    """The gather-then-softmax kernel the variants derive from passes: each failure is its variant's."""
    run = kit.get("escaped")
    base = [t for t in run.report["tests"] if "[fake_gather_sdpa-" in t["test_id"]]
    assert base and all(t["outcome"] in ("pass", "not_applicable") for t in base), [
        (t["test_id"], t["message"][:300]) for t in base if t["outcome"] not in ("pass", "not_applicable")
    ]
    assert {t["dtype"] for t in base if t["outcome"] == "pass"} >= {"float32", "bfloat16"}


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        (
            "fp16unserved",
            ["Capabilities.dtypes has float16, but no attention backend serves it", "--dtype float16"],
        ),
        ("graphsclaimed", ["Capabilities.graph_capture is True", "does not override step_graphs()"]),
    ],
)
def test_declarations_that_disagree_fail_at_l0(kit: KitRunner, name: str, fragments: list[str]) -> None:
    run = kit.get(name)
    assert run.returncode == 1, run.explain()
    messages = run.messages("test_l0_discovery.py::test_declarations_agree")
    for fragment in fragments:
        assert fragment in messages, f"{fragment!r} not in:\n{messages}"


def test_one_raising_dtype_is_one_cause_with_its_frame(kit: KitRunner) -> None:
    """A backend raising for bf16 fails many tests: one traceback-free cause, the raising line in the JSON."""
    run = kit.get("raiser")
    failing = run.tests("fail")
    assert run.returncode == 1 and len(failing) > 10, run.explain()
    assert all(t["dtype"] == "bfloat16" for t in failing), run.explain()
    assert all(t["location"] and "fake_kernels.py:" in t["location"] for t in failing), failing[0]
    (cause,) = run.report["failure_causes"]
    assert cause["count"] == len(failing) and "NotImplementedError: bfloat16 kernels" in cause["cause"]
    assert "Traceback" not in run.output and run.output.count("NotImplementedError") < 10, run.output[-4000:]
    # a line or two per failing test plus the matrix, never a traceback's dozens per test
    assert len(run.output.splitlines()) < 100 + 3 * len(failing), run.output[-4000:]


def test_a_run_without_the_device_says_so_and_is_not_a_pass(kit: KitRunner) -> None:
    run = kit.get("absent")
    assert run.returncode == 0, run.explain()  # nothing failed: CI without the device stays green
    assert run.report["status"] == "INCOMPLETE" and run.report["passed"] is True
    assert "no fake accelerator" in run.report["device_unavailable"]
    assert "hallm conformance INCOMPLETE" in run.output and "hallm conformance PASSED" not in run.output
    assert "NOT AVAILABLE" in run.output and "--require-device" in run.output
    assert run.report["summary"]["env_skip"] > 20
