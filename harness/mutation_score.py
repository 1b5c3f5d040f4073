"""`make mutate`'s summary: per mutated module, how many of mutmut's mutants the tests killed, and the score.

mutmut 3 keeps each mutant's outcome in ``mutants/<module>.py.meta`` as the exit code of the tests run
against it, which mutmut's own table names (killed, survived, no tests, timeout, ...)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "no tests", "timeout", "not checked")


def main(root: Path = Path("mutants")) -> int:
    rows = []
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        outcomes = Counter(status_by_exit_code[code] for code in codes)
        rows.append((meta.relative_to(root).as_posix().removesuffix(".meta"), outcomes))
    if not rows:
        print("no mutmut results under mutants/: run `mutmut run` first", file=sys.stderr)
        return 2
    total = sum((counts for _, counts in rows), Counter())
    print(f"{'module':34} {'mutants':>8} " + " ".join(f"{c:>11}" for c in COLUMNS) + "  score (killed)")
    for name, counts in [*rows, ("all", total)]:
        mutants = sum(counts.values())
        print(f"{name:34} {mutants:>8} " + " ".join(f"{counts[c]:>11}" for c in COLUMNS)
              + f"  {counts['killed'] / mutants:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
