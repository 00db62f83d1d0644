"""The house: stage folders, imports that only point down, nothing heavy or running at import.

Every import of a project module counts, the ones inside functions too: a cycle
hidden in a function is still a cycle, and a project module imported lazily
saves no start-up time (they are light). Only heavy third-party packages (and
the MLflow wrapper, which pulls MLflow in) are imported inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

PACKAGES = ("churnlib", "serve", "ray_jobs")
STAGES = ("data", "decision", "predlog", "monitor", "model", "train", "tune", "evaluate", "registry", "batch", "serving",
          "rollout")
# Lower rank = lower layer: a module imports only modules of a lower or equal rank
# (equal: within its own stage folder, or shared modules among themselves).
RANKS = {
    "churnlib.errors": 0, "churnlib.tags": 0, "churnlib.console": 0, "churnlib.interrupts": 0,
    "churnlib.config": 1, "churnlib.runtime": 1, "churnlib.figures": 1,
    "churnlib.tracking": 2,
    "churnlib.data": 3, "churnlib.decision": 3, "churnlib.predlog": 3,
    "churnlib.model": 4,
    "churnlib.train": 5, "churnlib.evaluate": 5, "churnlib.batch": 5,
    "churnlib.registry": 6, "churnlib.monitor": 6,
    "churnlib.tune": 7, "churnlib.serving": 7, "churnlib.rollout": 7,
    "churnlib.pyfunc": 8, "churnlib.quickstart": 8,
    "churnlib.cli": 9, "churnlib.__main__": 10,
    "serve": 9, "ray_jobs": 11,
}
HEAVY = ("ray", "mlflow", "xgboost", "shap", "matplotlib", "sklearn", "optuna")
LAZY_OWN = ("churnlib.model.pyfunc",)  # pulls in MLflow: scoring processes never import it
# The CLI imports a command's module when the command runs (they pull in pandas, numpy and
# pyarrow): `churn --help` and a bad flag answer at once. The workspace trainer's module runs
# in two processes: the command's side stays as light (it only attaches and prints), the
# trainer imports the training command. Those imports still count above.
LAZY_IMPORTERS = ("churnlib.cli", "churnlib.train.warm")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _own_imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # the longest project module the name refers to
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name:
                found.append((name, id(node) in inside, node.lineno))
    return found


def _rank(module: str) -> int:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANKS[prefix]
    raise AssertionError(f"{module} has no place in the layout (add it to RANKS)")


def test_every_stage_is_a_folder_and_the_top_level_is_shared_modules():
    top = sorted(p.stem for p in (REPO / "churnlib").glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "config", "console", "errors", "figures", "interrupts", "pyfunc",
                   "quickstart", "runtime", "tags", "tracking"]
    for stage in STAGES:
        assert (REPO / "churnlib" / stage / "__init__.py").is_file(), stage


def test_no_import_cycle_counting_imports_inside_functions():
    mods = _modules()
    graph = {m: {i for i, _, _ in _own_imports(p, mods) if i != m and not m.startswith(i + ".")} for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not an edge back up
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_only_point_down():
    mods = _modules()
    wrong = []
    for m, p in mods.items():
        for target, _, line in _own_imports(p, mods):
            if target == m or m.startswith(target + "."):
                continue
            if _rank(target) > _rank(m):
                wrong.append(f"{p.relative_to(REPO)}:{line} imports {target} (a higher layer)")
            same_rank_other_stage = (_rank(target) == _rank(m) and m.startswith("churnlib.")
                                     and target.split(".")[:2] != m.split(".")[:2] and _rank(m) >= 3)
            if same_rank_other_stage:
                wrong.append(f"{p.relative_to(REPO)}:{line} imports {target} (a sibling stage)")
    assert wrong == []


def test_project_modules_are_imported_at_the_top_only_heavy_packages_lazily():
    mods = _modules()
    lazy = []
    for m, p in mods.items():
        for target, inside, line in _own_imports(p, mods):
            if inside and target not in LAZY_OWN and m not in LAZY_IMPORTERS:
                lazy.append(f"{p.relative_to(REPO)}:{line} imports {target} inside a function")
    assert lazy == []
    # and no heavy package at module level in the modules `churn --help` imports
    heavy_top = []
    for m in ("churnlib.cli", "churnlib.config", "churnlib.errors", "churnlib.console", "churnlib.interrupts"):
        tree = ast.parse(mods[m].read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                heavy_top += [f"{m}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert heavy_top == []


def test_importing_the_library_starts_nothing_and_loads_no_heavy_package():
    code = (
        "import sys, threading\n"
        "import churnlib.cli, churnlib.quickstart, churnlib.tune.command, churnlib.serving.runner, serve.validation\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(heavy, threading.active_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "1"], out.stdout


def test_help_loads_no_data_stack():
    """`churn --help` (and a bad flag) import neither the commands' modules nor pandas, numpy, pyarrow."""
    code = ("import sys; from churnlib.cli import build_parser\n"
            "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'numpy', 'pyarrow', *%r}))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "quickstart" in out.stdout, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
