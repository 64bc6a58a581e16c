"""The import graph of bonehpc/ and jobs/, read from the source with `ast` (nothing is imported), and the
house rules it must keep (docs/architecture.md):

- Layers: `bonehpc.cli` (the console script) -> `jobs` (entry points and job graphs) -> the rest of
  `bonehpc`. No module of `bonehpc` outside `bonehpc.cli` (and `bonehpc.__main__`, which only starts it)
  imports `jobs`, at module level or inside a function.
- No import cycle, counting every import that runs: at module level (also inside `try`/`if` blocks and
  class bodies) and inside functions (a function-level import hides a dependency, it does not remove it);
  not those under `if TYPE_CHECKING:` (they never run). An import of a package's module is an edge to that
  module (`from bonehpc import slurm` -> bonehpc.slurm), of a name from a package to the package's __init__;
  the implicit import of parent packages (`bonehpc.data` before `bonehpc.data.shards`) is not an edge.
- No function (or method) in `bonehpc/` is longer than MAX_FUNCTION_LINES, counted from `def` to its last
  line, nested functions included in their parent.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bonehpc", "jobs")
MAX_FUNCTION_LINES = 100
CLI_LAYER = ("bonehpc.cli", "bonehpc.__main__")
"""Modules of bonehpc that sit above jobs (the console script) and may import it."""


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    runtime: set[str] = field(default_factory=set)
    """Modules imported when this one is imported (module level, not TYPE_CHECKING)."""
    deferred: set[str] = field(default_factory=set)
    """Modules imported inside functions or under TYPE_CHECKING."""
    typing_only: set[str] = field(default_factory=set)
    """Modules imported under TYPE_CHECKING only (never at run time)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    node: ast.AST, deferred: bool, out: list[tuple[ast.Import | ast.ImportFrom, bool, bool]], typing: bool = False
) -> None:
    """Every import under `node`, with whether it runs later than the module's own import and whether it
    is under TYPE_CHECKING (never runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append((child, deferred, typing))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            _imports(child, True, out, typing)
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for stmt in child.body:
                _imports(ast.Module(body=[stmt], type_ignores=[]), True, out, True)
            for stmt in child.orelse:
                _imports(ast.Module(body=[stmt], type_ignores=[]), deferred, out, typing)
        else:
            _imports(child, deferred, out, typing)


def _targets(node: ast.Import | ast.ImportFrom, mod: Module, known: set[str]) -> set[str]:
    """The project modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from . import x / from ..a import b
            pkg = mod.name.split(".") if mod.path.name == "__init__.py" else mod.name.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:  # `import bonehpc.data.shards as s` and dotted attributes
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


@functools.cache
def load_graph() -> dict[str, Module]:
    """Every module of bonehpc/ and jobs/ with the project modules it imports (parsed once per session)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            mods[name] = Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    known = set(mods)
    for mod in mods.values():
        found: list[tuple[ast.Import | ast.ImportFrom, bool, bool]] = []
        _imports(mod.tree, False, found)
        for node, deferred, typing in found:
            targets = _targets(node, mod, known) - {mod.name}
            (mod.deferred if deferred else mod.runtime).update(targets)
            if typing:
                mod.typing_only.update(targets)
    return mods


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def long_functions(mods: dict[str, Module], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'module.function: N lines' for each function of bonehpc/ longer than `limit` (outermost only)."""
    out = []

    def walk(node: ast.AST, mod: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (child.end_lineno or child.lineno) - child.lineno + 1
                if n > limit:
                    out.append(f"{mod}.{prefix}{child.name}: {n} lines ({child.lineno})")
                else:
                    walk(child, mod, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, mod, f"{prefix}{child.name}.")
            else:
                walk(child, mod, prefix)

    for name, mod in sorted(mods.items()):
        if name.split(".")[0] == "bonehpc":
            walk(mod.tree, name, "")
    return out


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ----------------------------------------------------------------------------------------------
# The rules


def test_the_graph_sees_the_imports_it_must() -> None:
    """The reader finds module-level, function-level, relative and TYPE_CHECKING imports (a guard that the
    rules below look at real edges)."""
    mods = load_graph()
    assert {"bonehpc.slurm", "bonehpc.registry", "jobs.submit", "bonehpc.cli"} <= set(mods)
    assert "bonehpc.slurm" in mods["jobs.submit"].runtime  # from bonehpc import slurm
    assert "jobs.submit" in mods["bonehpc.cli.slurm"].deferred  # inside a command function
    assert "bonehpc.registry" in mods["bonehpc.accounting"].runtime
    assert "bonehpc.config" in mods["bonehpc.paths"].deferred  # under TYPE_CHECKING
    assert "bonehpc.config" in mods["bonehpc.paths"].typing_only
    assert "bonehpc.config" not in mods["bonehpc.paths"].runtime
    assert "bonehpc.data.folds" in mods["bonehpc.preflight"].deferred - mods["bonehpc.preflight"].typing_only


def test_bonehpc_never_imports_jobs() -> None:
    mods = load_graph()
    bad = sorted(
        f"{name} -> {target}"
        for name, mod in mods.items()
        if name.split(".")[0] == "bonehpc" and not _in(name, CLI_LAYER)
        for target in mod.runtime | mod.deferred
        if _in(target, ("jobs",))
    )
    assert not bad, "the library imports its entry points (move the code to jobs/ or pass it in):\n" + "\n".join(bad)


def run_time_edges(mods: dict[str, Module]) -> dict[str, set[str]]:
    """Module -> the modules it imports when imported or when one of its functions runs (not TYPE_CHECKING)."""
    return {name: mod.runtime | (mod.deferred - mod.typing_only) for name, mod in mods.items()}


def test_no_import_cycle() -> None:
    """No cycle, function-level imports counted (they are dependencies too: evaluate -> train -> cli.train
    -> evaluate was one, hidden inside functions)."""
    cycles = find_cycles(run_time_edges(load_graph()))
    assert not cycles, "import cycles (function-level imports counted):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_counts_function_level_imports() -> None:
    """A cycle closed by an import inside a function is found; one closed under TYPE_CHECKING is not."""
    src = {
        "a": "def f():\n    import b\n",
        "b": "import a\n",
        "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import d\n",
        "d": "import c\n",
    }
    mods = {}
    for name, text in src.items():
        mod = Module(name, ROOT / f"{name}.py", ast.parse(text))
        found: list[tuple[ast.Import | ast.ImportFrom, bool, bool]] = []
        _imports(mod.tree, False, found)
        for node, deferred, typing in found:
            targets = _targets(node, mod, set(src)) - {name}
            (mod.deferred if deferred else mod.runtime).update(targets)
            if typing:
                mod.typing_only.update(targets)
        mods[name] = mod
    assert find_cycles(run_time_edges(mods)) == [["a", "b"]]


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_in_bonehpc_exceeds_the_limit() -> None:
    long = long_functions(load_graph())
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(long)
