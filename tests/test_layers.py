"""The house plan, checked in code: every tunesmith module imports only from lower floors.

Floors (docs/architecture.md explains each package's role):

    0  errors, settings, fileio, runs   the run directory's layout, named once
       tracking                         the metric sinks (W&B, MLflow, TensorBoard, trackio)
    1  models                           registry, loading, adapters, export
    2  data | graders                   formats, templates, validation | graders (OpenAI's shapes)
    3  generate | train                 the one engine | the training loop (never each other)
    4  evaluate | distill               metrics, reports, strategies | teacher data (never each
                                        other; both generate through generate/, never train)
       reinforce                        reinforcement fine-tuning: train/'s loop pieces, sampling
                                        through generate/, rewards from graders/
    5  flows                            the only library code that chains stages
    6  jobs                             queue, worker, job evaluation
    7  serve, dashboard                 HTTP (the only fastapi) | the dashboard's static pages,
                                        which serve/ routes (never the reverse)
    8  cli                              the command line (the only typer)

Every import is read with `ast`, function-level ones included. Besides floors: no import
cycles between modules, no function-level import of a tunesmith module below cli/ (the
graph stays visible at the top of each file), and fastapi/starlette only in serve/,
typer only in cli/.

    python -m pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"

FLOORS = {
    "errors": 0, "settings": 0, "fileio": 0, "runs": 0, "tracking": 0, "__init__": 0,
    "models": 1,
    "data": 2, "graders": 2,
    "generate": 3, "train": 3,
    "evaluate": 4, "distill": 4, "reinforce": 4,
    "flows": 5,
    "jobs": 6,
    "serve": 7, "dashboard": 7,
    "cli": 8, "__main__": 8,
}
SIBLINGS_APART = [{"generate", "train"}, {"evaluate", "distill"}, {"data", "graders"},
                  {"reinforce", "evaluate"}, {"reinforce", "distill"}]
"""Packages on the same floor that must not import each other."""
NEVER = {"evaluate": "train", "distill": "train", "dashboard": "serve"}
"""Packages a package must not use although its floor allows it: evaluation and
distillation generate through generate/, they never train; the dashboard is the pages
serve/ ships, and never reaches back into serve."""
ONLY_IN = {"fastapi": "serve", "starlette": "serve", "typer": "cli"}
"""Third-party packages only one of ours may import."""
LAZY_ALLOWED = {"cli", "__main__"}
"""Where a function-level import of a tunesmith module is allowed (to keep --help fast)."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(["tunesmith", *parts])


def package_of(module: str) -> str:
    """'tunesmith.generate.engine' -> 'generate'; 'tunesmith' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module top?) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from tunesmith.train import data` imports the module tunesmith.train.data
            names = [f"{stem}.{alias.name}" for alias in node.names] if stem.startswith("tunesmith") else [stem]
        else:
            continue
        for name in names:
            found.append((name, node.lineno, id(node) in top_level))
    return found


def resolve(name: str, modules: set[str]) -> str | None:
    """The tunesmith module an import names (the longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return "tunesmith" if name == "tunesmith" else None


def check_tree(root: Path) -> list[str]:
    """Every violation of the house plan under `root` (a tunesmith source folder)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        pkg = package_of(module)
        if pkg not in FLOORS:
            problems.append(f"{path}: package '{pkg}' has no floor; add it to FLOORS and docs/architecture.md")
            continue
        for name, line, top in imports_of(path, module):
            where = f"{path.relative_to(root.parent)}:{line}"
            third = name.split(".")[0]
            if third in ONLY_IN and pkg != ONLY_IN[third]:
                problems.append(f"{where}: imports {third}, which only {ONLY_IN[third]}/ may import")
            if not name.startswith("tunesmith"):
                continue
            target = resolve(name, modules)
            if target is None or target == module:
                continue
            graph[module].add(target)
            tpkg = package_of(target)
            if FLOORS.get(tpkg, 0) > FLOORS[pkg]:
                problems.append(f"{where}: {module} (floor {FLOORS[pkg]}) imports {target} (floor {FLOORS[tpkg]})")
            elif tpkg != pkg and {pkg, tpkg} in SIBLINGS_APART:
                problems.append(f"{where}: {module} imports {target}; {pkg} and {tpkg} never import each other")
            elif NEVER.get(pkg) == tpkg:
                problems.append(f"{where}: {module} imports {target}; {pkg} never uses {tpkg}")
            if not top and pkg not in LAZY_ALLOWED:
                problems.append(f"{where}: {module} imports {target} inside a function; import it at module top")
    problems += [f"import cycle: {' -> '.join(c)}" for c in find_cycles(graph)]
    return problems


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_source_tree_keeps_the_house_plan():
    problems = check_tree(SRC)
    assert not problems, "\n".join(problems)


def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "tunesmith" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "tunesmith"


CLEAN = {
    "__init__.py": "",
    "errors.py": "",
    "models/__init__.py": "",
    "models/registry.py": "from tunesmith.errors import UsageError\n",
    "generate/__init__.py": "",
    "generate/engine.py": "from tunesmith.models.registry import x\n",
    "train/__init__.py": "",
    "train/run.py": "import torch\n",
    "evaluate/__init__.py": "",
    "evaluate/metrics.py": "from tunesmith.generate.engine import LocalEngine\n",
    "serve/__init__.py": "",
    "serve/app.py": "import fastapi\nfrom tunesmith.generate.engine import LocalEngine\n",
    "cli/__init__.py": "import typer\n\ndef cmd():\n    from tunesmith.serve.app import create_app\n",
}


def test_a_clean_tree_passes(tmp_path):
    assert check_tree(_plant(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(("rel", "text", "expected"), [
    ("models/registry.py", "from tunesmith.generate.engine import LocalEngine\n", "(floor 1) imports tunesmith.generate.engine (floor 3)"),
    ("models/registry.py", "def f():\n    from tunesmith.serve import app\n", "imports tunesmith.serve.app (floor 7)"),
    ("generate/engine.py", "from tunesmith.train import run\n", "generate and train never import each other"),
    ("train/run.py", "def f():\n    from tunesmith.errors import UsageError\n", "inside a function; import it at module top"),
    ("generate/engine.py", "from ..serve.app import create_app\n", "imports tunesmith.serve.app (floor 7)"),
    ("evaluate/metrics.py", "from tunesmith.train.run import train\n", "evaluate never uses train"),
    ("train/run.py", "import fastapi\n", "imports fastapi, which only serve/ may import"),
    ("serve/app.py", "import typer\n", "imports typer, which only cli/ may import"),
    ("widgets/thing.py", "", "package 'widgets' has no floor"),
])
def test_a_planted_violation_fails(tmp_path, rel, text, expected):
    root = _plant(tmp_path, {**CLEAN, rel: text})
    problems = check_tree(root)
    assert any(expected in p for p in problems), problems


def test_a_planted_cycle_fails(tmp_path):
    root = _plant(tmp_path, {**CLEAN, "train/a.py": "from tunesmith.train import b\n", "train/b.py": "import tunesmith.train.a\n"})
    problems = check_tree(root)
    assert "import cycle: tunesmith.train.a -> tunesmith.train.b -> tunesmith.train.a" in problems, problems
