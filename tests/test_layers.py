"""The package layers of README "Code layout": a module imports only from its own package and from
packages of lower levels, so the learners never reach into the runtime and the runtime never into
the analysis or launch code. Checked statically from every module's imports (including imports
inside functions)."""

import ast
import os

import pytest

from prelar_jax.runtime.config import REPO_ROOT

PACKAGE = "prelar_jax"
LEVELS = {  # package (first component under prelar_jax) -> level
    "errors": 0,
    "types": 0,
    "model": 1,
    "envs": 1,
    "data": 2,
    "learners": 2,
    "runtime": 3,
    "analysis": 4,
    "perf": 4,
    "launch": 5,
}


def _modules():
    root = os.path.join(REPO_ROOT, PACKAGE)
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, REPO_ROOT), path


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == PACKAGE]


def _package(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(modules) -> list[str]:
    bad = []
    for rel, path in modules:
        own = rel.split(os.sep)[1].removesuffix(".py")
        if own == "__init__":  # the package root sets XLA flags before JAX loads
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), filename=rel)
        for line, name in _imported(tree):
            other = _package(name)
            if other is None or other == own:
                continue
            if other not in LEVELS:
                bad.append(f"{rel}:{line} imports {name}: package {other!r} has no level in LEVELS")
            elif LEVELS[other] >= LEVELS[own]:
                bad.append(f"{rel}:{line} ({own}, level {LEVELS[own]}) imports {name} ({other}, level {LEVELS[other]})")
    return bad


def test_every_package_has_a_level():
    top = sorted({rel.split(os.sep)[1].removesuffix(".py") for rel, _ in _modules()} - {"__init__"})
    assert sorted(LEVELS) == top


def test_no_module_imports_from_its_level_or_above():
    assert layer_violations(_modules()) == []


def test_the_check_finds_a_back_reference(tmp_path):
    """A learner importing the runtime is reported (the check can fail)."""
    path = tmp_path / "finetune.py"
    path.write_text("def f():\n    from prelar_jax.runtime import parallel\n")
    bad = layer_violations([(os.path.join(PACKAGE, "learners", "finetune.py"), str(path))])
    assert len(bad) == 1 and "prelar_jax.runtime.parallel" in bad[0]


@pytest.mark.parametrize("source", ["import prelar_jax.analysis.report\n", "from prelar_jax.launch import runner\n"])
def test_the_check_finds_runtime_importing_analysis(tmp_path, source):
    path = tmp_path / "loop.py"
    path.write_text(source)
    assert layer_violations([(os.path.join(PACKAGE, "runtime", "loop.py"), str(path))])
