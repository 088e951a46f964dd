"""The kit's outcomes, and the record of one test. Standard library only.

Five outcomes are kept apart (pass, fail, known failure, not applicable, environment skip),
plus two that are failures of the run: an unexpected pass of a test the vendor's xfails file
names (the ratchet: fix it, then remove the entry) and a test that never ran because an earlier
device error stopped the device's run (aborted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

PASS = "pass"
FAIL = "fail"
XFAIL = "xfail"  # a known failure, named in the vendor's xfails file
NOT_APPLICABLE = "not_applicable"  # the plugin declares it lacks the capability the test needs
ENV_SKIP = "env_skip"  # this environment lacks something (the device, the CPU reference plugin)
UNEXPECTED_PASS = "unexpected_pass"  # an xfails entry that passes: strict, so a failure
ABORTED = "aborted"  # not run: an earlier device error stopped the device's run

#: Every outcome, in report order.
OUTCOMES: tuple[str, ...] = (PASS, FAIL, XFAIL, NOT_APPLICABLE, ENV_SKIP, UNEXPECTED_PASS, ABORTED)
#: Outcomes that make the run fail (exit status 1).
FAILING: frozenset[str] = frozenset({FAIL, UNEXPECTED_PASS, ABORTED})

#: Skip reasons start with these prefixes so that a skip raised anywhere (a fixture, a test body,
#: the plugin's setup hook) is classified the same way.
NOT_APPLICABLE_PREFIX = "not applicable: "
ABORTED_PREFIX = "aborted: "

# When one test has several reports (setup, call, teardown), the worst outcome wins.
_SEVERITY = {
    PASS: 0,
    NOT_APPLICABLE: 1,
    ENV_SKIP: 1,
    XFAIL: 2,
    ABORTED: 3,
    UNEXPECTED_PASS: 4,
    FAIL: 5,
}


def classify_skip(reason: str) -> str:
    """The outcome of a skipped test, from its skip reason."""
    text = reason.strip()
    if text.startswith("Skipped: "):
        text = text[len("Skipped: ") :]
    if text.startswith(NOT_APPLICABLE_PREFIX):
        return NOT_APPLICABLE
    if text.startswith(ABORTED_PREFIX):
        return ABORTED
    return ENV_SKIP


def worse(a: str, b: str) -> str:
    """The more severe of two outcomes."""
    return a if _SEVERITY[a] >= _SEVERITY[b] else b


@dataclasses.dataclass
class TestRecord:
    """One kit test's result.

    test_id: "<module file>::<test name with parameters>", the id xfails entries match.
    group: the report's row (e.g. "L1 paged attention"). dtype: the report's column, or None
    for tests that do not depend on a dtype. message: why it failed, was skipped or is known to
    fail (empty for a pass).
    location: for a test that failed on an exception, the raising frame ("path:line (function)").
    """

    __test__ = False  # not a pytest test class, despite the name

    test_id: str
    group: str
    level: int
    dtype: str | None
    outcome: str
    message: str = ""
    duration: float = 0.0
    location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the JSON report."""
        return dataclasses.asdict(self)
