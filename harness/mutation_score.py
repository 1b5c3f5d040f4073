"""`make mutate`'s report after `mutmut run`: per mutated module what became of its mutants and the score
(killed, or timed out, of all), then each mutant the tests let through with its change, marked where
docs/testing.md explains it; exits 1 when the score is under ``MIN_SCORE``.

mutmut 3 keeps each mutant's outcome in ``mutants/<module>.py.meta`` as the exit code of the tests run
against it, which mutmut's own table names (killed, survived, no tests, timeout, ...)."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

MIN_SCORE = 0.8
CAUGHT = ("killed", "timeout")  # a mutant that makes the tests hang is found as surely as one that fails them
COLUMNS = (*CAUGHT, "survived", "no tests", "not checked")
EXPLAINED_IN = Path("docs/testing.md")  # the survivors judged equivalent, each named in backquotes


def outcomes(root: Path) -> dict[str, dict[str, str]]:
    """Module path -> mutant name -> mutmut's status."""
    return {meta.relative_to(root).as_posix().removesuffix(".meta"): {
        name: status_by_exit_code[code] for name, code in json.loads(meta.read_text())["exit_code_by_key"].items()}
        for meta in sorted(root.rglob("*.py.meta"))}


def change(name: str, module: str) -> list[str]:
    """The mutant's lines, removed and added (`mutmut show NAME` has the whole function)."""
    diff = get_diff_for_mutant(name, path=module).splitlines()
    return [line for line in diff if line[:1] in "-+" and line[:3] not in ("---", "+++")]


def main(root: Path = Path("mutants"), explained_in: Path = EXPLAINED_IN) -> int:
    found = outcomes(root)
    if not found:
        print(f"no mutmut results under {root}/: run `mutmut run` first", file=sys.stderr)
        return 2
    counts = {module: Counter(statuses.values()) for module, statuses in found.items()}
    total = sum(counts.values(), Counter())
    print(f"{'module':32} {'mutants':>7} " + " ".join(f"{c:>11}" for c in COLUMNS) + "  score")
    for module, count in [*counts.items(), ("all", total)]:
        mutants = sum(count.values())
        print(f"{module:32} {mutants:>7} " + " ".join(f"{count[c]:>11}" for c in COLUMNS)
              + f"  {sum(count[c] for c in CAUGHT) / mutants:.1%}")

    explained = set(re.findall(r"`([\w.ǁ]+__mutmut_\d+)`", explained_in.read_text()))
    let_through = [(module, name, status) for module, statuses in found.items()
                   for name, status in statuses.items() if status not in (*CAUGHT, "not checked")]
    if let_through:
        print(f"\nnot killed ({sum(name in explained for _, name, _ in let_through)} of them judged equivalent "
              f"in {explained_in}; `mutmut show NAME` shows the whole function):")
    for module, name, status in let_through:
        print(f"  {name}: {status}" + (f" (equivalent: {explained_in})" if name in explained else ""))
        print("\n".join(f"      {line}" for line in change(name, module)))
    score = sum(total[c] for c in CAUGHT) / sum(total.values())
    print(f"\nmutation score {score:.1%} ({MIN_SCORE:.0%} wanted)")
    return 0 if score >= MIN_SCORE else 1


if __name__ == "__main__":
    sys.exit(main())
