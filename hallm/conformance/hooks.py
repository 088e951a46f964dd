"""The kit's session hooks: applicability, xfails, outcomes, device-error abort, report.

Registered by the pytest plugin (`hallm.conformance.plugin`) in every session, so it imports only
the standard library, pytest and the kit's stdlib-only modules, and every hook is inert unless the
kit's own tests are collected.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from hallm.conformance import outcomes as oc
from hallm.conformance.report import (
    FAILED,
    INCOMPLETE,
    PASSED,
    build_report,
    failure_causes,
    matrix,
    run_passed,
    run_status,
    summarize,
    unavailable_note,
    write_reports,
)
from hallm.conformance.state import MAX_LEVEL, KitState, is_kit_item, kit_test_id
from hallm.conformance.xfails import find_entry

#: Failure causes listed in the terminal summary (all of them are in the report).
MAX_CAUSES = 12

#: Exception text that means the device itself is in trouble; later tests would fail spuriously.
DEVICE_ERROR = re.compile(
    r"CUDA error|CUDA driver error|cudaError|CUBLAS_STATUS|CUDNN_STATUS|device-side assert|"
    r"illegal memory access|unspecified launch failure|misaligned address|illegal instruction|"
    r"HIP error|hipError|XPU error|UR_RESULT_ERROR|NPU error|ACL error|XlaRuntimeError|"
    r"device lost|DEVICE_LOST|ECC error|AcceleratorError|NRT error|Neuron runtime error"
)


class KitHooks:
    """The hooks that need the session's state; inert until the kit's tests are collected."""

    def __init__(self, state: KitState) -> None:
        self.state = state
        self.first_failure: dict[tuple[str, str | None], str] = {}

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        kit_items = [item for item in items if is_kit_item(item)]
        if not kit_items:
            return
        state = self.state
        state.activate()
        deselected = [i for i in kit_items if _level(i) > state.level]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            dropped = set(map(id, deselected))
            items[:] = [i for i in items if id(i) not in dropped]
        for item in items:
            if not is_kit_item(item):
                continue
            state.items[item.nodeid] = item
            entry = find_entry(state.xfails, kit_test_id(item))
            if entry is not None:
                item.add_marker(pytest.mark.xfail(reason=f"{entry.reason} [{entry.source}]", strict=True))

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        """Tests deselected after the kit saw them (`-k`, `-m`) are not in the run: never
        reported as aborted."""
        for item in items:
            self.state.items.pop(item.nodeid, None)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if not is_kit_item(item):
            return
        state = self.state
        if state.abort_reason:
            pytest.skip(oc.ABORTED_PREFIX + state.abort_reason)
        tokens = [t for mark in item.iter_markers("hallm_requires") for t in mark.args]
        reason = state.target().missing(tokens)
        if reason is None:
            return
        if state.require_device and not state.target().available and oc.classify_skip(reason) == oc.ENV_SKIP:
            pytest.fail(f"--hallm-require-device: {reason}", pytrace=False)
        pytest.skip(reason)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if is_kit_item(item) and call.excinfo is not None and report.failed:
            message, location = _message(call.excinfo), _location(call.excinfo)
            report.hallm_message, report.hallm_location = message, location
            # The message and the raising frame, never a traceback: a plugin that raises for one
            # dtype fails a hundred tests, and the same cause is printed once.
            # An explicit --tb keeps pytest's traceback for the first test with that failure.
            key = (message, location)
            first = self.first_failure.setdefault(key, item.nodeid)
            where = f"\n(raised at {location})" if location else ""
            if first != item.nodeid:
                report.longrepr = f"same failure as {first}{where}"
            elif item.config.getoption("tbstyle", "auto") == "auto":
                report.longrepr = message + where
            if call.when in ("setup", "call"):
                self._check_device(item, call.excinfo.value)
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        state = self.state
        item = state.items.get(report.nodeid)
        if item is None:
            return
        outcome, message = _classify(report)
        if outcome is None:
            return
        location = getattr(report, "hallm_location", None) if outcome == oc.FAIL else None
        record = state.records.get(report.nodeid)
        if record is None:
            record = state.records[report.nodeid] = _record(item, outcome, message)
            record.location = location
        elif outcome != record.outcome and oc.worse(outcome, record.outcome) == outcome:
            record.outcome, record.message, record.location = outcome, message, location
        record.duration += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        state = self.state
        if not state.active:
            return
        stop = state.abort_reason or str(session.shouldstop or session.shouldfail or "the run stopped early")
        for nodeid, item in state.items.items():
            if nodeid not in state.records:
                state.records[nodeid] = _record(item, oc.ABORTED, f"not run: {stop}")
        records = list(state.records.values())
        if state.report_path:
            report = build_report(state.meta(), records, state.xfails, state.device_unavailable())
            self.paths = (state.report_path, str(write_reports(report, state.report_path)))
        if not run_passed(records) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        state = self.state
        if not state.active:
            return
        records = list(state.records.values())
        tr = terminalreporter
        tr.section(f"hallm conformance: device {state.device_id}")
        tr.write_line(", ".join(f"{k} {v}" for k, v in summarize(records).items()))
        tr.write_line(matrix(records))
        causes = failure_causes(records)
        if causes:
            tr.write_line(f"failures by cause ({sum(len(ids) for _, ids in causes)} tests):", red=True)
            for cause, ids in causes[:MAX_CAUSES]:
                more = f" and {len(ids) - 1} more" if len(ids) > 1 else ""
                tr.write_line(f"  {len(ids)} x {cause}\n      e.g. {ids[0]}{more}")
            if len(causes) > MAX_CAUSES:
                tr.write_line(f"  ... {len(causes) - MAX_CAUSES} more causes (see the report)")
        unavailable = state.device_unavailable()
        if unavailable:
            tr.write_line(unavailable_note(unavailable, records), yellow=True)
        if state.abort_reason:
            tr.write_line(f"ABORTED after a device error: {state.abort_reason}", red=True)
        for entry in state.xfails:
            if not entry.matched:
                tr.write_line(f"xfails entry matched no test: {entry.pattern} ({entry.source})", yellow=True)
        paths = getattr(self, "paths", None)
        if paths:
            tr.write_line(f"report: {paths[0]} and {paths[1]}")
        status = run_status(records, unavailable)
        tr.write_line(
            f"hallm conformance {status}",
            green=status == PASSED,
            yellow=status == INCOMPLETE,
            red=status == FAILED,
            bold=True,
        )

    def _check_device(self, item: pytest.Item, exc: BaseException) -> None:
        """After a failure: is the device dead? Then stop its run; the rest is marked aborted."""
        state = self.state
        if state.abort_reason:
            return
        cause: str | None = None
        text = str(exc).strip()
        if not isinstance(exc, (AssertionError, pytest.fail.Exception)) and DEVICE_ERROR.search(
            f"{type(exc).__name__}: {text}"
        ):
            cause = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        else:
            platform = state.platform_if_loaded()
            if platform is not None:
                try:
                    platform.synchronize()
                except Exception as sync_exc:
                    cause = f"synchronize() raised {type(sync_exc).__name__}: {sync_exc}"
        if cause is None:
            return
        state.abort_reason = f"device error in {kit_test_id(item)}: {cause}"
        item.session.shouldstop = (
            f"hallm conformance: {state.abort_reason}; the remaining tests are marked aborted"
        )


def _record(item: pytest.Item, outcome: str, message: str) -> oc.TestRecord:
    return oc.TestRecord(
        test_id=kit_test_id(item),
        group=_group(item),
        level=_level(item),
        dtype=_dtype(item),
        outcome=outcome,
        message=message,
    )


def _level(item: pytest.Item) -> int:
    mark = item.get_closest_marker("hallm_level")
    return int(mark.args[0]) if mark else MAX_LEVEL


def _group(item: pytest.Item) -> str:
    mark = item.get_closest_marker("hallm_group")
    return str(mark.args[0]) if mark else f"L{_level(item)} {getattr(item, 'originalname', item.name)}"


def _dtype(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    value = callspec.params.get("dtype") if callspec is not None else None
    return str(value) if value is not None else None


def _location(excinfo: pytest.ExceptionInfo[BaseException]) -> str | None:
    """ "path:line (function)" of the frame that raised, for an exception (not a kit diagnosis).

    The innermost frame outside torch, numpy and the standard library, so a shape error raised
    deep in torch points at the plugin's line that called it.
    """
    if isinstance(excinfo.value, (pytest.fail.Exception, pytest.skip.Exception)):
        return None
    frames = list(excinfo.traceback)
    if not frames:
        return None
    libs = ("/torch/", "/numpy/", os.path.dirname(os.__file__) + os.sep)
    chosen = next((f for f in reversed(frames) if not any(p in str(f.path) for p in libs)), frames[-1])
    return f"{chosen.path}:{chosen.lineno + 1} ({chosen.name})"


def _message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    exc = excinfo.value
    if isinstance(exc, pytest.fail.Exception):
        return str(exc.msg or "")[:4000]
    return excinfo.exconly()[:4000]


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


def _classify(report: pytest.TestReport) -> tuple[str | None, str]:
    """The outcome one report (setup, call or teardown) contributes, and its message."""
    wasxfail = getattr(report, "wasxfail", None)
    if report.skipped:
        if wasxfail is not None:
            return oc.XFAIL, str(wasxfail)
        reason = _skip_reason(report).removeprefix("Skipped: ")
        return oc.classify_skip(reason), reason
    if report.failed:
        text = report.longreprtext
        if report.when == "call" and text.startswith("[XPASS(strict)]"):
            return oc.UNEXPECTED_PASS, "passed, but the xfails file says: " + text[len("[XPASS(strict)] ") :]
        message = getattr(report, "hallm_message", None) or text[:4000]
        return oc.FAIL, ("teardown: " if report.when == "teardown" else "") + message
    if report.when != "call":
        return None, ""
    if wasxfail is not None:
        return oc.UNEXPECTED_PASS, f"passed, but the xfails file says: {wasxfail}"
    return oc.PASS, "; ".join(str(v) for k, v in report.user_properties if k == "hallm_note")
