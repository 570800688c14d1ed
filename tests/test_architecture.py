"""The code map holds: arrows point one way, with no circle and no hidden arrow, in short pieces.

`make lint` runs ruff and import-linter; the tests here break a copy of the package on purpose
and check that lint catches it, and add what a contract cannot see: circles among modules of
one layer's package faces, and imports by a string.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BIN = Path(sys.executable).parent
LINT_IMPORTS = BIN / "lint-imports"
RUFF = BIN / "ruff"
needs_linters = pytest.mark.skipif(
    not (LINT_IMPORTS.exists() and RUFF.exists()),
    reason="no linters (make setup)",
)


def run_lint(tree: Path) -> subprocess.CompletedProcess:
    """What ``make lint`` checks of imports, on the ``gluon_ft`` package inside ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    config = str(tree / "pyproject.toml")
    ruff = subprocess.run(
        [str(RUFF), "check", "--config", config, "--output-format", "concise", "gluon_ft"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ruff.returncode != 0:
        return ruff
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", config, "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    shutil.copytree(
        REPO / "gluon_ft", tmp_path / "gluon_ft", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_line(package: Path, module: str, line: str) -> None:
    path = package / "gluon_ft" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402, F401\n")


@needs_linters
def test_the_contracts_hold(package_copy):
    kept = run_lint(package_copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr


# Each breaks one arrow; the third to the fifth are the ones the contracts of turn 3 let through.
BROKEN_ARROWS = {
    "train imports the cli": (
        "train/run.py",
        "from gluon_ft.cli import main",
        "gluon_ft.train.run -> gluon_ft.cli",
    ),
    "deploy imports train": (
        "deploy/predict.py",
        "from gluon_ft.train import train",
        "is not allowed to import gluon_ft.train",
    ),
    "predict imports report (a circle)": (
        "deploy/predict.py",
        "from gluon_ft.deploy.report import build_report",
        "gluon_ft.deploy.predict -> gluon_ft.deploy.report",
    ),
    "demo imports the cli": (
        "demo.py",
        "from gluon_ft.cli import main",
        "gluon_ft.demo -> gluon_ft.cli",
    ),
    "the base imports the cli by a string": (
        "errors.py",
        'import importlib; importlib.import_module("gluon_ft.cli")',
        "TID251",
    ),
    # Inside cli/ (its own contract): the shared module stays below the commands, and the
    # command groups stay independent of each other.
    "the cli's shared module imports a command": (
        "cli/common.py",
        "from gluon_ft.cli.train import TRAIN",
        "gluon_ft.cli.common -> gluon_ft.cli.train",
    ),
    "one command group imports another": (
        "cli/deploy.py",
        "from gluon_ft.cli.data import PACK",
        "gluon_ft.cli.deploy -> gluon_ft.cli.data",
    ),
}


@needs_linters
@pytest.mark.parametrize("name", BROKEN_ARROWS)
def test_lint_fails_on_an_arrow_back_up(package_copy, name):
    module, line, reported = BROKEN_ARROWS[name]
    add_line(package_copy, module, line)
    broken = run_lint(package_copy)
    assert broken.returncode != 0
    assert reported in broken.stdout


def import_graph() -> dict[str, set[str]]:
    """Every module of gluon_ft and the gluon_ft modules it imports (function bodies included)."""
    import grimp

    graph = grimp.build_graph("gluon_ft")
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# `python -m gluon_ft.train` is an entry point that reaches the CLI (the contract's one ignore).
ENTRY_POINT = ("gluon_ft.train.__main__", "gluon_ft.cli")


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_circle_anywhere_in_the_package():
    graph = import_graph()
    graph[ENTRY_POINT[0]].discard(ENTRY_POINT[1])
    assert circles(graph) == []


STRING_IMPORTERS = {"import_module", "__import__", "run_module", "find_spec"}


def string_imports(source: str) -> list[str]:
    """Calls that import a ``gluon_ft`` module by a string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0]
        if (
            name in STRING_IMPORTERS
            and isinstance(first, ast.Constant)
            and str(first.value).startswith("gluon_ft")
        ):
            found.append(f"{name}({first.value!r}) at line {node.lineno}")
    return found


def test_string_imports_are_flagged():
    assert string_imports('import importlib\nimportlib.import_module("gluon_ft.cli")\n')
    assert string_imports('__import__("gluon_ft.train")\n')
    assert not string_imports('__import__("json")\n')


def test_no_module_imports_gluon_ft_by_a_string():
    found = {
        str(path.relative_to(REPO)): hits
        for path in sorted((REPO / "gluon_ft").rglob("*.py"))
        if (hits := string_imports(path.read_text()))
    }
    assert found == {}


def long_functions(limit: int = 60) -> list[str]:
    long = []
    for path in sorted((REPO / "gluon_ft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    long.append(f"{path.relative_to(REPO)}:{node.name} ({length} lines)")
    return long


def test_no_function_in_the_package_is_over_60_lines():
    assert long_functions() == []


def test_the_package_root_shows_the_layers():
    loose = sorted(p.name for p in (REPO / "gluon_ft").glob("*.py"))
    assert len(loose) <= 10, loose
    packages = {p.name for p in (REPO / "gluon_ft").iterdir() if (p / "__init__.py").exists()}
    assert {"data", "model", "train", "deploy", "cluster", "cli"} <= packages
