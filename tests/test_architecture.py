"""The rooms hold what their names say: `ensir_flow/` is pure code (kernels, solvers, models,
presentation) with the API as the one façade over `pipelines/`; no module imports another's private
names; a pipeline's functions nest at most one closure deep, so a plan reads top to bottom."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("ensir_flow", "pipelines") for p in (ROOT / folder).rglob("*.py") if not p.is_symlink())
#: Modules of `ensir_flow/` that may reach the pipelines and the schedulers: the façade and the CLI.
FACADE = {"ensir_flow/api.py"}
SCHEDULERS_AND_PIPELINES = ("dask", "distributed", "pipelines", ".pipelines")


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module as written, names imported from it) for every import in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(("." * node.level + (node.module or ""), [alias.name for alias in node.names]))
    return found


def _nested_too_deep(node: ast.AST, depth: int = 0, chain: tuple = ()) -> list[str]:
    """Functions defined inside a function that is itself inside a function ('a > b > c')."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            if depth >= 2:
                found.append(" > ".join((*chain, child.name)))
            found += _nested_too_deep(child, depth + 1, (*chain, child.name))
        elif isinstance(child, ast.ClassDef):
            found += _nested_too_deep(child, depth, (*chain, child.name))
        else:
            found += _nested_too_deep(child, depth, chain)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=_relative)
def test_no_module_imports_another_modules_private_names(path):
    private = [
        f"{module}.{name}"
        for module, names in _imports(ast.parse(path.read_text()))
        if module.startswith((".", "ensir_flow"))
        for name in names
        if name.startswith("_")
    ]
    assert private == []


@pytest.mark.parametrize("path", [p for p in SOURCES if _relative(p).startswith("ensir_flow/")], ids=_relative)
def test_only_the_api_reaches_pipelines_and_schedulers(path):
    if _relative(path) in FACADE:
        return
    reached = [module for module, _ in _imports(ast.parse(path.read_text())) if module.split(".")[0] in SCHEDULERS_AND_PIPELINES]
    reached += [module for module, _ in _imports(ast.parse(path.read_text())) if module.startswith(".pipelines")]
    assert reached == []


@pytest.mark.parametrize("path", [p for p in SOURCES if _relative(p).startswith("pipelines/")], ids=_relative)
def test_pipeline_closures_nest_at_most_one_level(path):
    assert _nested_too_deep(ast.parse(path.read_text())) == []
