"""The vendor's xfails file: known failures, as data kept in the plugin's repository.

One entry per line: a test-id pattern, whitespace, then the reason (required; put an issue link
in it). `#` starts a comment line; blank lines are ignored. Patterns match the kit's test ids
("test_l1_attention.py::test_paged_attention[acme_flash-bfloat16-h64-b16-kvauto-long_context]")
or just the part after "::"; `*` matches any run of characters and `?` one character; every
other character (brackets included) is literal. Example:

    # hallm-acme known failures
    test_l1_attention.py::test_paged_attention[*-long_context]  SRAM tiling overflows (acme#12)
    test_l3_end_to_end.py::test_greedy_matches_cpu[qwen2-*]   bias add in fp16 (acme#15)

Entries are strict: a listed test that passes fails the run, so a fixed bug forces its entry out.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path


class XfailsFileError(ValueError):
    """The xfails file is malformed; the message names the file and line."""


@dataclasses.dataclass
class XfailEntry:
    """One known failure: where it came from, what it matches, and why."""

    pattern: str
    reason: str
    source: str  # "path:line"
    matched: int = 0
    _regex: re.Pattern[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._regex = glob_to_regex(self.pattern)

    def matches(self, test_id: str) -> bool:
        """True when the pattern matches the full test id or the part after "::"."""
        name = test_id.split("::", 1)[-1]
        return bool(self._regex.fullmatch(test_id) or self._regex.fullmatch(name))


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`*` and `?` are wildcards; everything else (pytest ids have brackets) is literal."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts))


def parse_xfails(text: str, source: str = "<xfails>") -> list[XfailEntry]:
    """Parse an xfails file's text; raises XfailsFileError for an entry without a reason."""
    entries: list[XfailEntry] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, *rest = line.split(None, 1)
        reason = rest[0].strip() if rest else ""
        if not reason:
            raise XfailsFileError(
                f"{source}:{lineno}: entry {pattern!r} has no reason; write "
                "'<test-id pattern>  <why it fails, with an issue link>'"
            )
        entries.append(XfailEntry(pattern=pattern, reason=reason, source=f"{source}:{lineno}"))
    return entries


def load_xfails(path: str | Path) -> list[XfailEntry]:
    """Read and parse an xfails file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise XfailsFileError(f"cannot read the xfails file {p}: {exc}") from exc
    return parse_xfails(text, str(p))


def find_entry(entries: list[XfailEntry], test_id: str) -> XfailEntry | None:
    """The first entry matching `test_id` (counting the match), or None."""
    for entry in entries:
        if entry.matches(test_id):
            entry.matched += 1
            return entry
    return None
