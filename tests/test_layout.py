"""The layout's rules, read from the code: the imports of every module of harness/ (those inside
functions included) must form no circle, run only down the layers (plan <- records <- objectives
<- stages <- {launch, views, worker} <- {jobs, cli}), keep torch, DeepSpeed and transformers on the
rank side (worker/ and the child programs in jobs/), and reach harness.worker only from worker/
and jobs/. docs/ARCHITECTURE.md draws the layers."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "harness"
# Each folder of harness/ (cli.py counts as "cli") may import its own folder and the layers below it;
# demo/ (the embedded plan and its data) imports nothing of the harness.
LAYERS = [{"plan", "demo"}, {"records"}, {"objectives"}, {"stages"}, {"launch", "views", "worker"}, {"jobs", "cli"}]
RANK_ONLY_PACKAGES = {"torch", "deepspeed", "transformers"}
RANK_SIDE = {"worker", "jobs"}
MAX_LINES = 450


def modules(root: Path = HARNESS) -> dict[str, Path]:
    """'harness.plan.load' -> its file, for every module of the package ('harness.plan' is its __init__.py)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in a file, at any depth: a harness module as its
    most specific module name (`from harness.stages import fast` is harness.stages.fast), anything
    else as its top-level package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "harness":
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
            else:
                target = target.split(".")[0]
            found.append((target, node.lineno))
    return found


def folder_of(name: str) -> str:
    """'harness.plan.load' -> 'plan'; 'harness.cli' -> 'cli'; 'harness' -> ''."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(folder: str) -> int:
    return next(k for k, layer in enumerate(LAYERS) if folder in layer)


def graph(root: Path = HARNESS) -> dict[str, list[tuple[str, int]]]:
    known = modules(root)
    return {name: imports(path, name, set(known)) for name, path in known.items()}


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Every circle of harness modules, as the modules on it (depth-first search, one per circle found)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in dict.fromkeys(target for target, _ in edges.get(node, [])):
            if target not in edges:
                continue
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def layer_problems(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    problems = []
    for name, targets in edges.items():
        source = folder_of(name)
        for target, line in targets:
            if target.split(".")[0] in RANK_ONLY_PACKAGES and source not in RANK_SIDE:
                problems.append(f"{name}:{line} imports {target}: torch, deepspeed and transformers belong to worker/ and jobs/")
            if not target.startswith("harness.") or not source:
                continue
            into = folder_of(target)
            if into == "worker" and source not in RANK_SIDE:
                problems.append(f"{name}:{line} imports {target}: harness.worker is imported from worker/ and jobs/ only")
            elif into != source and layer_of(into) >= layer_of(source):
                problems.append(f"{name}:{line} imports {target}: {source}/ may import only layers below it ({' <- '.join('/'.join(sorted(l)) for l in LAYERS)})")
    return problems


def test_the_imports_form_no_circle():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in found)


def test_imports_run_down_the_layers_and_torch_stays_on_the_rank_side():
    problems = layer_problems(graph())
    assert not problems, "\n".join(problems)


def test_the_launch_side_imports_no_torch_when_it_runs():
    """Every launch-side module imported in a fresh interpreter (imports inside functions run only
    when called: the AST rule above covers those) leaves torch, deepspeed and transformers unloaded."""
    launch_side = sorted(name for name in modules() if folder_of(name) not in RANK_SIDE)
    code = f"import sys; import {', '.join(launch_side)}; sys.exit(sorted({RANK_ONLY_PACKAGES!r} & set(sys.modules)) or None)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_module_is_longer_than_a_newcomer_reads_at_once():
    long = {str(path.relative_to(HARNESS)): n for path in HARNESS.rglob("*.py") if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: split them by concern"


@pytest.mark.parametrize("module, added, expected", [
    ("plan/model.py", "from harness.stages import Stage\n", "plan/ may import only layers below it"),
    ("records/files.py", "def f():\n    import torch\n", "torch, deepspeed and transformers belong to worker/ and jobs/"),
    ("views/status.py", "from harness.worker.memory import rss_bytes\n", "harness.worker is imported from worker/ and jobs/ only"),
])
def test_the_rules_catch_a_stray_import(tmp_path: Path, module: str, added: str, expected: str):
    """The checks fail on a tree where one import breaks a rule (a copy of harness/ with it added)."""
    copy = _copy(tmp_path)
    (copy / module).write_text((copy / module).read_text() + "\n" + added)
    assert any(expected in problem for problem in layer_problems(graph(copy)))


def test_the_rules_catch_a_circle(tmp_path: Path):
    copy = _copy(tmp_path)
    (copy / "plan" / "fields.py").write_text((copy / "plan" / "fields.py").read_text() + "\nfrom harness.plan.load import parse_plan\n")
    assert any("harness.plan.fields" in circle for circle in cycles(graph(copy)))


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "harness"
    for path in HARNESS.rglob("*.py"):
        target = copy / path.relative_to(HARNESS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return copy
