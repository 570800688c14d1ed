"""The code map holds: arrows point one way (import-linter), and train/ reads in short pieces."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on the ``gluon_ft`` package inside ``tree``, with its contracts."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
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


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (make setup)")
def test_the_contracts_hold_and_fail_when_train_imports_the_cli(package_copy):
    kept = lint_imports(package_copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    run_py = package_copy / "gluon_ft" / "train" / "run.py"
    run_py.write_text(run_py.read_text() + "\nfrom gluon_ft.cli import main  # noqa: E402\n")
    broken = lint_imports(package_copy)
    assert broken.returncode != 0
    assert "gluon_ft.train.run -> gluon_ft.cli" in broken.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (make setup)")
def test_deploy_may_not_import_the_training_code(package_copy):
    predict = package_copy / "gluon_ft" / "predict.py"
    predict.write_text(predict.read_text() + "\nfrom gluon_ft.train import train  # noqa: E402\n")
    broken = lint_imports(package_copy)
    assert broken.returncode != 0
    assert "gluon_ft.predict is not allowed to import gluon_ft.train" in broken.stdout


def test_no_function_in_train_is_over_80_lines():
    long = []
    for path in sorted((REPO / "gluon_ft" / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long
