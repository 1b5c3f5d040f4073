"""The house's shape, read from the source: detkit's subpackages import only downwards in one order,
nothing in the library reaches up into stages/, tests/ or benchmarks/, stages stay thin and
family-blind, and no Python source is built in a string."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.import_graph import REPO_ROOT, imported_modules

# Top to bottom: a subpackage may import its own modules and those of the subpackages below it.
LAYERS = ("cloud", "serve", "train", "eval", "models", "data", "config", "core")
STAGE_MAX_LINES = 150


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "detkit":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "detkit"


def upward_imports(root: Path) -> list[str]:
    """``file:line imports module`` for every import in ``root/detkit`` against ``LAYERS``, and every
    import of stages/, tests/ or benchmarks/ from the library."""
    found = []
    for path in sorted((root / "detkit").rglob("*.py")):
        rel = path.relative_to(root)
        own = rel.parts[1] if len(rel.parts) > 2 else "detkit"
        for line, module in imported_modules(path, root):
            target = layer_of(module)
            if target is None:
                found.append(f"{rel}:{line} imports {module} (the library never imports {module.split('.')[0]}/)")
            elif own == "detkit":  # detkit/__init__.py: runs before every import of detkit, so only core
                if target != "core":
                    found.append(f"{rel}:{line} imports {module} (detkit/__init__.py may import only detkit.core)")
            elif target == "detkit" or LAYERS.index(target) < LAYERS.index(own):
                found.append(f"{rel}:{line} imports {module} ({own} is below {target} in {' -> '.join(LAYERS)})")
    return found


def test_detkit_imports_only_downwards():
    assert upward_imports(REPO_ROOT) == []


def test_a_planted_upward_import_is_found(tmp_path):
    for rel in ("detkit/__init__.py", "detkit/core/__init__.py", "detkit/core/fsio.py", "detkit/data/__init__.py",
                "detkit/data/labelmap.py", "detkit/serve/__init__.py", "detkit/serve/predict.py", "stages/train.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "detkit/data/labelmap.py").write_text("import os\n\n\ndef f():\n    from detkit.serve import predict\n")
    (tmp_path / "detkit/core/fsio.py").write_text("from stages import train\n")
    assert upward_imports(tmp_path) == [
        "detkit/core/fsio.py:1 imports stages.train (the library never imports stages/)",
        f"detkit/data/labelmap.py:5 imports detkit.serve.predict (data is below serve in {' -> '.join(LAYERS)})"]


def test_benchmarks_and_their_harness_import_no_stage_and_no_test():
    paths = sorted([*(REPO_ROOT / "benchmarks").glob("*.py"), *(REPO_ROOT / "harness").glob("*.py")])
    bad = [f"{path.relative_to(REPO_ROOT)}:{line} {module}" for path in paths
           for line, module in imported_modules(path) if module.split(".")[0] in ("stages", "tests")]
    assert bad == []


STAGES = sorted((REPO_ROOT / "stages").glob("*.py"))


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_stage_modules_are_thin(path):
    assert len(path.read_text().splitlines()) <= STAGE_MAX_LINES
    tree = ast.parse(path.read_text())
    assert not [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and not n.name.endswith("Error")]
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While)) and path.name == "train.py"]


FAMILY_NAMES = ("retinanet", "RetinaNet", "dfine", "DFine", "d_fine", "faster_rcnn", "FasterRCNN")
# What runs any family: the stages, training, eval, export and serving, deploy. (The config schema
# names each family's keys; detkit/models/ holds the families.)
FAMILY_BLIND = [*STAGES, *(path for layer in ("train", "eval", "serve", "cloud")
                           for path in (REPO_ROOT / "detkit" / layer).glob("*.py"))]


@pytest.mark.parametrize("path", FAMILY_BLIND, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_only_detkit_models_names_a_family(path):
    code = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(code) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(code) if isinstance(n, ast.Attribute)} | {
        module for _, module in imported_modules(path)} | {
        a.name for n in ast.walk(code) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} | {
        n.module or "" for n in ast.walk(code) if isinstance(n, ast.ImportFrom)}
    assert not {name for name in names for family in FAMILY_NAMES if family in name}


def python_in_strings(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """String constants, other than docstrings, that are Python source with an import or a definition."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    found = []
    for node in ast.walk(tree):
        texts = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            texts = [node.value]
        elif isinstance(node, ast.JoinedStr):  # an f-string: its literal parts, with placeholders as names
            texts = ["".join(v.value if isinstance(v, ast.Constant) else "x" for v in node.values)]
        for text in texts:
            if "\n" not in text:
                continue
            try:
                parsed = ast.parse(text)
            except SyntaxError:
                continue
            definitions = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
            if any(isinstance(n, definitions) for n in ast.walk(parsed)):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_python_source_is_built_in_a_string(tmp_path):
    folders = ("detkit", "stages", "benchmarks", "serving", "sample")
    code = [path for folder in folders for path in (REPO_ROOT / folder).rglob("*.py")]
    assert [hit for path in code for hit in python_in_strings(path)] == []
    planted = tmp_path / "entry.py"
    planted.write_text('"""A docstring may show code:\n\nimport os\n"""\n\n'
                       'ENTRY = f"""import sys\nfrom {"stages"}.train import main\nsys.exit(main([]))\n"""\n')
    assert python_in_strings(planted, tmp_path) == ["entry.py:6"]
