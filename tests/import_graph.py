"""The repository's own import graph, read from the source with ``ast`` (no code is run): every
``import`` and ``from ... import``, at module level or inside a function (a deferred import runs
all the same), resolved to the repository's files."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("detkit", "stages", "benchmarks", "tests", "sample")


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of a dotted module of this repository (a package's ``__init__.py``), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = REPO_ROOT) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in ``path`` of a module of the repository at ``root``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = module_name(path, root)
    package = own.rpartition(".")[0] if path.name != "__init__.py" else own
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from a.b import c`: c is a module when a file holds it, else a name in a.b.
            names = [f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}", root) else base
                     for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


@cache
def closure(path: Path) -> frozenset[Path]:
    """``path`` and every repository file it imports, directly or not, with the packages' ``__init__.py``
    files that importing them runs."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for _, module in imported_modules(current):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                found = module_file(".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return frozenset(seen)
