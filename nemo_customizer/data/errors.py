"""``DatasetError`` and the collector that lets one run report many bad rows at once.

Users fix a dataset faster when they see every problem in one go, so validation records problems here and raises a
single ``DatasetError`` at the end instead of stopping at the first bad line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

MAX_REPORTED_ISSUES = 10
"""Problems spelled out in one error message; the rest are counted ("... and N more")."""


class DatasetError(ValueError):
    """The dataset cannot be used as given. The message names file:line and field and says how to fix it."""


@dataclass(frozen=True)
class DatasetIssue:
    """One problem: where it is, what is wrong, and what a valid input looks like."""

    location: str
    """``path`` or ``path:line`` (1-based line)."""
    problem: str
    """What is wrong, without a trailing period, e.g. ``field "prompt" is missing``."""
    hint: str
    """What to do, as a full sentence."""

    def __str__(self) -> str:
        return f"{self.location}: {self.problem}."


@dataclass
class IssueLog:
    """Collects ``DatasetIssue``s (keeping the first ``limit``) and raises them together as one ``DatasetError``."""

    limit: int = MAX_REPORTED_ISSUES
    issues: list[DatasetIssue] = field(default_factory=list)
    count: int = 0

    def add(self, location: str, problem: str, hint: str) -> None:
        self.count += 1
        if len(self.issues) < self.limit:
            self.issues.append(DatasetIssue(location, problem, hint))

    def raise_if_any(self) -> None:
        """Raise one ``DatasetError`` describing every recorded issue; do nothing when there are none."""
        if self.count:
            raise DatasetError(format_issues(self.issues, self.count))


def format_issues(issues: list[DatasetIssue], total: int) -> str:
    """One issue: ``loc: problem. hint``. Several: a header, one line each, ``... and N more``, then the hints."""
    if total == 1:
        return f"{issues[0]} {issues[0].hint}"
    lines = [f"{total} problems in the dataset:"]
    lines += [f"  {issue}" for issue in issues]
    if total > len(issues):
        lines.append(f"  ... and {total - len(issues)} more")
    lines += list(dict.fromkeys(issue.hint for issue in issues))  # each distinct hint once, in order of first use
    return "\n".join(lines)


def raise_one(location: str, problem: str, hint: str) -> NoReturn:
    """Raise a ``DatasetError`` for a problem that makes further checking pointless (missing path, no files)."""
    raise DatasetError(f"{DatasetIssue(location, problem, hint)} {hint}")
