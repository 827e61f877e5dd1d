"""Problem collection: one line per problem, naming the block or inode it concerns.

Problems are printed as they are found (a long check shows progress and a crash later
still leaves the earlier findings on screen) and counted for the summary and exit code.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TextIO

log = logging.getLogger(__name__)

#: After this many problems of one kind, the rest are only counted.
DEFAULT_KIND_LIMIT = 50


@dataclass
class Problem:
    """One inconsistency: `where` names the block/inode/file, `what` says what is wrong."""

    kind: str
    where: str
    what: str

    def line(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Report:
    """Collects problems and informational notes and prints them."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    verbose: bool = False
    kind_limit: int = DEFAULT_KIND_LIMIT
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def problem(self, kind: str, where: str, what: str) -> None:
        """Record a problem; `kind` groups similar ones so a flood stays readable."""
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        p = Problem(kind, where, what)
        self.problems.append(p)
        if n <= self.kind_limit:
            print(p.line(), file=self.out)
        elif n == self.kind_limit + 1:
            print(f"(further '{kind}' problems are counted but not shown)", file=self.out)

    def note(self, text: str) -> None:
        """A progress or informational line, shown with -v only."""
        if self.verbose:
            print(text, file=self.out)

    @property
    def total(self) -> int:
        return len(self.problems)

    def summary(self, device: str) -> str:
        if not self.problems:
            return f"{device}: clean, no problems found"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        return f"{device}: {self.total} problem(s) found, not corrected ({kinds})"
