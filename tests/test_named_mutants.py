"""harness.named_mutants (`make mutate`'s hand-named mutations): each still names code that exists, once,
and its tests exist, so a refactor that moves the code fails here rather than late in `make mutate`."""

from __future__ import annotations

import pytest

from harness.named_mutants import MUTANTS, Mutant, apply
from harness.repo_copy import REPO_ROOT


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_changes_code_found_once_and_names_tests_that_exist(mutant):
    text = (REPO_ROOT / mutant.path).read_text()
    assert text.count(mutant.before) == 1
    compile(text.replace(mutant.before, mutant.after), mutant.path, "exec")  # still Python
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert (REPO_ROOT / path).is_file(), test
        assert not name or f"def {name}(" in (REPO_ROOT / path).read_text(), test


def test_a_mutant_whose_code_has_moved_is_refused_by_name(tmp_path):
    (tmp_path / "module.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="mutant 'gone': its code is not found exactly once in module.py"):
        apply(tmp_path, Mutant("gone", "module.py", "y = 2\n", "y = 3\n", ("tests/test_x.py",)))
    assert (tmp_path / "module.py").read_text() == "x = 1\n"
