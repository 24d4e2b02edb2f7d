"""The layering the cache protocol rests on, read from the source: the mixers and models never import
``yoco.compress`` nor test what kind of cache they hold, and the package's import graph has no cycle."""

import ast
from pathlib import Path

import pytest

import yoco

SRC = Path(yoco.__file__).parent
# Every class defined where the cache kinds live: a mixer or model testing any of them asks what it holds.
CACHE_MODULES = ["cache.py", *(f"mixers/{p.name}" for p in sorted((SRC / "mixers").glob("*.py"))),
                 "compress/store.py", "compress/infllm.py"]


def module_name(path: Path) -> str:
    parts = ("yoco", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def run_when_imported(tree: ast.AST):
    """Every statement that may run: the module's and its functions' (an import deferred into a
    function still makes a cycle, only a later one), but not ``if TYPE_CHECKING:`` blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending += node.orelse
            continue
        yield node
        pending += ast.iter_child_nodes(node)


def imported(name: str, path: Path, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The yoco modules an import statement of module ``name`` loads (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "yoco"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "yoco":
        return []
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return submodules if submodules and len(submodules) == len(node.names) else [base, *submodules]


def import_graph() -> dict[str, set[str]]:
    """module -> the yoco modules it imports, at import time or later (relative imports included)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        graph[name] = {m for node in run_when_imported(tree) for m in imported(name, path, node, known)
                       if m in known and m != name}
    return graph


def all_imports(path: Path) -> list[str]:
    """Every yoco module an import anywhere in the file names (functions included)."""
    name, known = module_name(path), modules()
    return [m for node in ast.walk(ast.parse(path.read_text())) for m in imported(name, path, node, known)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: every strongly connected group of two or more modules (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cache_classes() -> set[str]:
    return {node.name for rel in CACHE_MODULES for node in ast.walk(ast.parse((SRC / rel).read_text()))
            if isinstance(node, ast.ClassDef)}


def names_in(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, (ast.Name, ast.Attribute))}


def type_tests(tree: ast.AST, classes: set[str]) -> list[str]:
    """``isinstance(x, C)`` / ``issubclass(x, C)`` / ``type(x) is C`` (or ==, in) with a class C of
    ``classes``, as source text."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
                and names_in(node.args[1]) & classes):
            found.append(ast.unparse(node))
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            calls_type = any(isinstance(s, ast.Call) and isinstance(s.func, ast.Name) and s.func.id == "type"
                             for s in sides)
            if calls_type and any(names_in(s) & classes for s in sides if not isinstance(s, ast.Call)):
                found.append(ast.unparse(node))
    return found


MIXERS_AND_MODELS = sorted([*(SRC / "mixers").glob("*.py"), *(SRC / "models").glob("*.py")])


@pytest.mark.parametrize("path", MIXERS_AND_MODELS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_mixers_and_models_never_import_compress(path):
    assert [m for m in all_imports(path) if m.startswith("yoco.compress")] == []


@pytest.mark.parametrize("path", MIXERS_AND_MODELS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_mixers_and_models_never_test_a_cache_kind(path):
    assert type_tests(ast.parse(path.read_text()), cache_classes()) == []


def test_the_core_never_imports_compress():
    core = [SRC / "cache.py", SRC / "kernels.py", SRC / "layers.py", SRC / "engine.py"]
    assert {str(p.name): [m for m in all_imports(p) if m.startswith("yoco.compress")] for p in core} == {
        p.name: [] for p in core}


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(group) for group in found)


def test_the_scanners_see_what_they_look_for():
    """The checks above can fail: each finds the thing it forbids in source that has it."""
    classes = cache_classes()
    assert {"KVCache", "RingKVCache", "LatentCache", "CompressedKV", "InfLLMKV", "CallKV"} <= classes
    bad = ast.parse("if isinstance(cache, (KVCache, store.CompressedKV)) or type(c) is LatentCache: pass")
    assert len(type_tests(bad, classes)) == 2
    assert type_tests(ast.parse("isinstance(module, nn.Linear); type(m).__name__"), classes) == []
    known = modules()
    relative = ast.parse("from ..compress.store import CompressedKV\nfrom .. import compress").body
    mixer = SRC / "mixers" / "attention.py"
    assert [imported("yoco.mixers.attention", mixer, n, known) for n in relative] == [
        ["yoco.compress.store"], ["yoco.compress"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    deferred = ast.parse("def f():\n    from .store import CompressedKV\nif TYPE_CHECKING:\n    from .policies import P")
    store = SRC / "compress" / "infllm.py"
    assert [m for n in run_when_imported(deferred) for m in imported("yoco.compress.infllm", store, n, known)] == [
        "yoco.compress.store"]
