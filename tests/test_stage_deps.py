"""Every DVC stage's code dependencies cover the modules it imports.

For each stage of ``dvc.yaml`` whose command is ``python -m budgetalloc...``, the
import closure of that module inside the ``budgetalloc`` package is computed from
the source (every ``import`` statement, those inside functions included, since a
lazy import runs as surely as a top-level one). Each module of the closure must be
a stage dependency, itself or through a folder it lies in; otherwise an edit to it
could change the stage's outputs while ``dvc status`` reports the stage up to date.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "budgetalloc"


def module_file(name: str) -> Path | None:
    """The source file of a module of the package, or None when there is none."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(name: str, path: Path) -> set[str]:
    """The package's modules that one module imports (and the packages they lie in)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules: set[str] = set()
    for full in found:
        if full != PACKAGE and not full.startswith(PACKAGE + "."):
            continue
        parts = full.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if module_file(prefix) is not None:
                modules.add(prefix)
    return modules


def import_closure(root: str) -> set[Path]:
    """The source files of every package module that ``root`` reaches by imports."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        parts = name.split(".")
        todo.extend(".".join(parts[:end]) for end in range(1, len(parts)))
        todo.extend(imported_names(name, path) - seen)
    return {module_file(name) for name in seen if module_file(name) is not None}


def stage_modules() -> list[tuple[str, str, list[str]]]:
    """(stage, module, deps) for every dvc.yaml stage that runs a package module."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    rows = []
    for stage, spec in stages.items():
        match = re.search(r"python -m (budgetalloc(?:\.\w+)*)", spec["cmd"])
        if match:
            rows.append((stage, match.group(1), [str(d) for d in spec.get("deps", [])]))
    return rows


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(d) or Path(d) in relative.parents for d in deps)


def test_closure_sees_lazy_and_relative_imports(tmp_path):
    """The closure follows an import inside a function body (the stage module imports lazily)."""
    closure = import_closure("budgetalloc.stages.allocate")
    names = {p.relative_to(SRC).as_posix() for p in closure}
    assert "budgetalloc/stages/allocate.py" in names
    assert "budgetalloc/stages/__init__.py" in names
    assert "budgetalloc/__init__.py" in names
    assert len(names) > 5


def test_every_stage_runs_a_package_module():
    rows = stage_modules()
    assert {stage for stage, _, _ in rows} >= {"prepare", "train", "policy", "evaluate", "allocate"}


@pytest.mark.parametrize("stage,module,deps", stage_modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_cover_import_closure(stage, module, deps):
    missing = sorted(
        p.relative_to(ROOT).as_posix() for p in import_closure(module) if not covered(p, deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r} imports modules its deps omit: {missing}"


def folder_deps(module: str) -> list[str]:
    """The coarse deps for a stage: each subpackage it reaches as a folder (``stages/``: its files)."""
    deps = set()
    for path in import_closure(module):
        parts = path.relative_to(SRC).parts
        if len(parts) > 2 and parts[1] != "stages":
            deps.add(SRC.relative_to(ROOT).joinpath(*parts[:2]).as_posix())
        else:
            deps.add(path.relative_to(ROOT).as_posix())
    return sorted(deps)


def test_folder_deps_cover_the_closure():
    """What ``python tests/test_stage_deps.py`` prints for dvc.yaml passes the check above."""
    for _, module, _ in stage_modules():
        deps = folder_deps(module)
        assert all(covered(p, deps) for p in import_closure(module))
        assert f"src/{module.replace('.', '/')}.py" in deps


if __name__ == "__main__":  # print each stage's code dependencies (folders), for dvc.yaml
    for stage_name, module_name, _ in stage_modules():
        print(f"{stage_name}:")
        for dep in folder_deps(module_name):
            print(f"      - {dep}")
