"""Merging the ranks' KV connector results (hallm.core.executors.kv_reports): a load counts only
where every rank loaded it, a send finishes once every rank reported it (in any step), counters
add up, and reports of steps nobody waited for do not pile up."""

from __future__ import annotations

from hallm.core.executors.kv_reports import KVReport, KVReportMerger
from hallm.core.outputs import ModelRunnerOutput


def output(loaded: set[str], sent: set[str], stats: dict[str, int]) -> ModelRunnerOutput:
    return ModelRunnerOutput({}, kv_loaded=loaded, kv_finished_sending=sent, kv_connector_stats=stats)


def step(merger: KVReportMerger, step_id: int, outs: list[ModelRunnerOutput]) -> ModelRunnerOutput:
    """Feed every rank's output of one step (rank 0 first) and merge into rank 0's."""
    for i, out in enumerate(outs):
        assert not merger.complete(step_id)
        merger.add(step_id, KVReport.of(out))
        assert merger.complete(step_id) == (i == len(outs) - 1)
    merger.merge(step_id, outs[0])
    return outs[0]


def test_loads_intersect_and_counters_add_up() -> None:
    merger = KVReportMerger(2)
    merged = step(
        merger,
        0,
        [output({"a", "b"}, set(), {"tokens_saved": 8}), output({"a"}, set(), {"tokens_saved": 8, "x": 1})],
    )
    assert merged.kv_loaded == {"a"}
    assert merged.kv_connector_stats == {"tokens_saved": 16, "x": 1}


def test_a_send_finishes_once_every_rank_reported_it() -> None:
    merger = KVReportMerger(2)
    first = step(merger, 0, [output(set(), {"a", "b"}, {}), output(set(), {"b"}, {})])
    assert first.kv_finished_sending == {"b"}
    second = step(merger, 1, [output(set(), set(), {}), output(set(), {"a"}, {})])
    assert second.kv_finished_sending == {"a"}
    third = step(merger, 2, [output(set(), set(), {}), output(set(), set(), {})])
    assert third.kv_finished_sending == set()


def test_reports_of_steps_never_merged_are_dropped() -> None:
    merger = KVReportMerger(2)
    merger.add(0, KVReport(set(), {"a"}, {}))  # rank 1 of a step whose handle was dropped
    merger.add(0, KVReport(set(), {"a"}, {}))
    merged = step(merger, 1, [output(set(), set(), {}), output(set(), set(), {})])
    assert merged.kv_finished_sending == {"a"}  # its sends still count
    assert not merger._reports
