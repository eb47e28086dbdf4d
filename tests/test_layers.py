"""The import contracts of pyproject.toml hold, cover every module, and would catch a violation."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import budgetalloc

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def lint(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd / "src"), str(cwd)])}
    return subprocess.run([*LINT, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_project_keeps_its_contracts():
    result = lint(ROOT, "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_every_top_level_module_sits_in_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    modules = {m.name for m in pkgutil.iter_modules(budgetalloc.__path__)}
    assert modules == named


def test_a_violation_is_caught(tmp_path):
    pkg = tmp_path / "src" / "demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("X = 1\n")
    # a function-level import of a higher layer, and of a forbidden package
    (pkg / "low.py").write_text("def f():\n    from demo import high\n    import prefect\n    return high.X, prefect\n")
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_package = demo\ninclude_external_packages = True\n\n"
        "[importlinter:contract:layers]\nname = layers\ntype = layers\ncontainers = demo\n"
        "layers =\n    high\n    low\n\n"
        "[importlinter:contract:prefect]\nname = no prefect\ntype = forbidden\nsource_modules = demo\n"
        "forbidden_modules = prefect\n")
    result = lint(tmp_path, "--no-cache")
    assert result.returncode != 0
    assert "0 kept, 2 broken" in result.stdout, result.stdout + result.stderr
