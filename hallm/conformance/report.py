"""The kit's report: JSON for machines, a Markdown matrix for people. Standard library only.

The matrix has one row per test group and one column per dtype (tests that do not depend on a
dtype are in the column "any"); a cell reads "passed / applicable / total" (ONNX's backend
scoreboard style), followed by the count of failures and known failures when there are any.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hallm.conformance.outcomes import (
    ABORTED,
    ENV_SKIP,
    FAIL,
    FAILING,
    NOT_APPLICABLE,
    OUTCOMES,
    PASS,
    UNEXPECTED_PASS,
    XFAIL,
    TestRecord,
)
from hallm.conformance.xfails import XfailEntry

#: Column order of the matrix; other dtypes follow, then "any".
DTYPE_ORDER = ("float32", "bfloat16", "float16")
ANY_DTYPE = "any"

#: The run's verdict. INCOMPLETE: nothing failed, but tests were skipped because this
#: environment lacks something (the device, most often): not a conformance pass.
PASSED, FAILED, INCOMPLETE = "PASSED", "FAILED", "INCOMPLETE"


def summarize(records: Iterable[TestRecord]) -> dict[str, int]:
    """Count of each outcome (every outcome present, zero included)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for record in records:
        counts[record.outcome] += 1
    return counts


def run_passed(records: Sequence[TestRecord]) -> bool:
    """True when nothing failed, passed unexpectedly or was aborted (exit status 0)."""
    return not any(r.outcome in FAILING for r in records)


def run_status(records: Sequence[TestRecord], device_unavailable: str | None = None) -> str:
    """PASSED, FAILED, or INCOMPLETE (nothing failed, but the environment skipped tests)."""
    if not run_passed(records):
        return FAILED
    if device_unavailable is not None or any(r.outcome == ENV_SKIP for r in records):
        return INCOMPLETE
    return PASSED


def unavailable_note(reason: str, records: Sequence[TestRecord]) -> str:
    """What a run without the device did not test, and how to make that an error."""
    counts = summarize(records)
    applicable = len(records) - counts[NOT_APPLICABLE]
    skipped = collections.Counter(f"L{r.level}" for r in records if r.outcome == ENV_SKIP)
    levels = ", ".join(f"{n} at {level}" for level, n in sorted(skipped.items()))
    return (
        f"the device is NOT AVAILABLE here ({reason}): {counts[ENV_SKIP]} of {applicable} applicable tests "
        f"were skipped ({levels or 'none'}), so this run checked declarations and discovery only, not "
        "the kernels or the engine. Run the kit where the device is; pass --require-device "
        "(--hallm-require-device) to make a missing device fail the run"
    )


def _cause(record: TestRecord) -> str:
    """A failure's cause without its numbers: the last (most specific) finding, else the first line."""
    lines = record.message.strip().splitlines()
    findings = [line.strip()[2:] for line in lines if line.strip().startswith("- ")]
    text = findings[-1] if findings else (lines[0] if lines else "(no message)")
    text = text.split(" [", 1)[0]  # the configuration in brackets differs from test to test
    text = re.sub(r"(?<!\w)\d+(\.\d+)?(e-?\d+)?", "#", text)
    if record.location:
        text += f" (raised at {record.location})"
    return text if len(text) <= 300 else text[:297] + "..."


def failure_causes(records: Sequence[TestRecord]) -> list[tuple[str, list[str]]]:
    """Failing tests grouped by cause, the most frequent first: [(cause, [test ids])]."""
    groups: dict[str, list[str]] = {}
    for r in records:
        if r.outcome in (FAIL, UNEXPECTED_PASS):
            groups.setdefault(_cause(r), []).append(r.test_id)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def build_report(
    meta: dict[str, Any],
    records: Sequence[TestRecord],
    xfails: Sequence[XfailEntry],
    device_unavailable: str | None = None,
) -> dict[str, Any]:
    """The JSON report: `meta` (versions, device, options), verdict, summary, causes, every test."""
    status = run_status(records, device_unavailable)
    return {
        **meta,
        "passed": run_passed(records),
        "status": status,
        "device_unavailable": device_unavailable,
        "failure_causes": [
            {"cause": c, "count": len(ids), "tests": ids} for c, ids in failure_causes(records)
        ],
        "summary": summarize(records),
        "xfail_entries": [
            {"pattern": e.pattern, "reason": e.reason, "source": e.source, "matched": e.matched}
            for e in xfails
        ],
        "tests": [r.to_dict() for r in records],
    }


def write_reports(report: dict[str, Any], json_path: str | Path) -> Path:
    """Write the JSON report and the Markdown matrix next to it (same name, `.md`); return the latter."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path = path.with_suffix(".md")
    md_path.write_text(markdown(report), encoding="utf-8")
    return md_path


def _columns(records: Sequence[TestRecord]) -> list[str]:
    present = {r.dtype or ANY_DTYPE for r in records}
    known = [d for d in DTYPE_ORDER if d in present]
    others = sorted(present - set(DTYPE_ORDER) - {ANY_DTYPE})
    return known + others + ([ANY_DTYPE] if ANY_DTYPE in present else [])


def _cell(records: list[TestRecord]) -> str:
    if not records:
        return ""
    counts = summarize(records)
    applicable = len(records) - counts[NOT_APPLICABLE]
    text = f"{counts[PASS]}/{applicable}/{len(records)}"
    bad = counts[FAIL] + counts[UNEXPECTED_PASS] + counts[ABORTED]
    if bad:
        text += f" **✗{bad}**"
    if counts[XFAIL]:
        text += f" xfail {counts[XFAIL]}"
    if counts[ENV_SKIP]:
        text += f" skip {counts[ENV_SKIP]}"
    return text


def matrix(records: Sequence[TestRecord]) -> str:
    """The Markdown matrix: rows are test groups (in run order), columns dtypes."""
    columns = _columns(records)
    groups: dict[str, list[TestRecord]] = {}
    for record in sorted(records, key=lambda r: r.level):
        groups.setdefault(record.group, []).append(record)
    lines = [
        "| test group | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for group, members in groups.items():
        cells = [_cell([r for r in members if (r.dtype or ANY_DTYPE) == c]) for c in columns]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def markdown(report: dict[str, Any]) -> str:
    """The whole Markdown report: identity, summary, matrix, then the details that matter."""
    records = [TestRecord(**t) for t in report["tests"]]
    plugin = report.get("plugin", {})
    status = report.get("status") or ("PASSED" if report["passed"] else "FAILED")
    out = [
        f"# hallm conformance: device `{report.get('device_id')}`: {status}",
        "",
        f"- device: {report.get('device_name')} (probe: {report.get('probe', {}).get('reason', '-')})",
        f"- plugin: {plugin.get('distribution')} {plugin.get('version')} (plugin API {plugin.get('api_version')})",
        f"- core: hallm {report.get('core_version')} (plugin API {report.get('api_version')}), "
        f"kit {report.get('kit_version')}, torch {report.get('torch_version')}, "
        f"python {report.get('python_version')}",
        f"- run: levels 0-{report.get('level')}, {'quick sample' if report.get('quick') else 'full matrix'}, "
        f"xfails file: {report.get('xfails_file') or 'none'}, at {report.get('started')}, "
        f"{report.get('duration_s', 0):.1f} s",
    ]
    if report.get("abort_reason"):
        out.append(f"- **aborted**: {report['abort_reason']}")
    if report.get("device_unavailable"):
        out.append(f"- **incomplete**: {unavailable_note(report['device_unavailable'], records)}")
    summary = report["summary"]
    out += [
        "",
        "| " + " | ".join(OUTCOMES) + " |",
        "|" + "---|" * len(OUTCOMES),
        "| " + " | ".join(str(summary[o]) for o in OUTCOMES) + " |",
        "",
        "Cells: passed / applicable / total (applicable = total - not applicable).",
        "",
        matrix(records),
    ]
    if report.get("failure_causes"):
        out += ["", "## Failures by cause", ""]
        out += [f"- {c['count']} x {c['cause']} (e.g. `{c['tests'][0]}`)" for c in report["failure_causes"]]
    sections = [
        (FAIL, "Failures"),
        (UNEXPECTED_PASS, "Unexpected passes (remove them from the xfails file)"),
        (ABORTED, "Aborted"),
        (XFAIL, "Known failures (xfails file)"),
    ]
    for outcome, title in sections:
        chosen = [r for r in records if r.outcome == outcome]
        if chosen:
            out += ["", f"## {title}", ""]
            out += [
                f"- `{r.test_id}`: {_first_line(r.message)}"
                + (f" (raised at {r.location})" if r.location else "")
                for r in chosen
            ]
    noted = [r for r in records if r.outcome == PASS and r.message]
    if noted:
        out += ["", "## Notes on passing tests", ""]
        out += [f"- `{r.test_id}`: {_first_line(r.message)}" for r in noted]
    for outcome, title in ((NOT_APPLICABLE, "Not applicable"), (ENV_SKIP, "Environment skips")):
        reasons = collections.Counter(_first_line(r.message) for r in records if r.outcome == outcome)
        if reasons:
            out += ["", f"## {title}", ""]
            out += [f"- {n} x {reason}" for reason, n in reasons.most_common()]
    unused = [e for e in report.get("xfail_entries", []) if not e["matched"]]
    if unused:
        out += ["", "## Xfail entries that matched no test run", ""]
        out += [f"- `{e['pattern']}` ({e['source']})" for e in unused]
    return "\n".join(out) + "\n"
