"""bench/ is a package whose scripts import cleanly: each ``bench/<name>.py`` imports as ``bench.<name>``, in a
process where no bench module is imported yet, without output (importing defines; ``main()`` runs only under
``python -m``), the modules import each other without a cycle, and none reaches its siblings through ``sys.path``."""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


def _tree(name: str) -> ast.Module:
    path = BENCH / f"{name}.py"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def bench_imports(name: str) -> dict[str, int]:
    """The bench modules that ``bench/<name>.py`` imports, anywhere in the file (a function's import runs too), with
    the line of the first: ``import bench.x``, ``from bench import x``, ``from bench.x import y``, the relative
    forms, and a sibling's bare name (``from x import y``: the ``sys.path`` way)."""
    found: dict[str, int] = {}

    def add(module: str | None, line: int) -> None:
        if module in MODULES and module != name:
            found.setdefault(module, line)

    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                add(parts[1] if parts[0] == "bench" and len(parts) > 1 else parts[0], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] != "bench":
                add(parts[0], node.lineno)  # a bare sibling name
            elif parts[-1] in ("bench", "") or (node.level and not node.module):
                for alias in node.names:  # from bench import x / from . import x
                    add(alias.name, node.lineno)
            else:
                add(parts[1] if parts[0] == "bench" and len(parts) > 1 else parts[0], node.lineno)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path that ends where it starts (``[a, b, a]``), or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_bench_is_a_package() -> None:
    assert (BENCH / "__init__.py").is_file(), "bench/__init__.py is missing: the scripts run as python -m bench.<name>"
    assert len(MODULES) >= 10, MODULES


def test_no_sys_path_tricks() -> None:
    """Siblings are imported as ``bench.<name>``: no bench module edits ``sys.path`` or imports a sibling by its
    bare name (which only works with bench/ itself on the path, and imports a module twice under two names)."""
    problems = []
    for name in MODULES:
        for node in ast.walk(_tree(name)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "path"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "sys"
                and node.attr in ("insert", "append", "extend")
            ):
                problems.append(f"bench/{name}.py:{node.lineno}: sys.path.{node.attr}")
            bare = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                bare = [node.module]
            problems += [
                f"bench/{name}.py:{node.lineno}: bare import of {m}" for m in bare if m.split(".")[0] in MODULES
            ]
    assert not problems, "\n".join(problems)


def test_no_import_cycle() -> None:
    graph = {name: set(bench_imports(name)) for name in MODULES}
    cycle = find_cycle(graph)
    if cycle:
        lines = [f"bench/{a}.py:{bench_imports(a)[b]} imports {b}" for a, b in itertools.pairwise(cycle)]
        pytest.fail("import cycle among bench modules: " + " -> ".join(cycle) + "\n" + "\n".join(lines))


# Run in a fresh interpreter: it imports what the bench modules import at their top from outside bench (torch,
# transformers, raydora, ...: most of the time), then forks a child per bench module, in which nothing of bench is
# imported yet, and imports ``bench.<name>`` there. One interpreter start instead of one per module: seconds, not
# the half minute that thirteen torch imports take on two cores.
_IMPORT_EACH = r"""
import io, json, os, sys, traceback

modules, preload = json.loads(sys.argv[1])
for name in preload:
    try:
        __import__(name)
    except Exception:
        pass  # the child that needs it reports the error
results = {}
for name in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        sys.stdout = io.StringIO()
        try:
            __import__(f"bench.{name}")
            out = {"ok": True, "stdout": sys.stdout.getvalue()}
        except BaseException:
            out = {"ok": False, "error": traceback.format_exc()}
        with os.fdopen(write, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    results[name] = json.loads(text) if text else {"ok": False, "error": "the child died without a word"}
print(json.dumps(results))
"""


def _preload() -> list[str]:
    """What the bench modules import at their top level from outside bench."""
    names = set()
    for name in MODULES:
        for node in _tree(name).body:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] not in ("bench", "__future__", *MODULES))


@pytest.fixture(scope="module")
def imported() -> dict[str, dict[str, Any]]:
    """Per bench module: did ``import bench.<name>`` succeed in a process where no bench module was imported, and
    what did it print."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps([MODULES, _preload()])], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", MODULES)
def test_imports_cleanly(name: str, imported: dict[str, dict[str, Any]]) -> None:
    got = imported[name]
    assert got["ok"], f"import bench.{name} failed:\n{got['error'][-3000:]}"
    assert got["stdout"] == "", f"import bench.{name} printed (does it run at import?):\n{got['stdout'][-2000:]}"
