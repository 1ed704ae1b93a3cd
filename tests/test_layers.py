"""Imports point one way: every module of xqcli (and of kernels/, shipped as xqcli.kernels) imports only
from its own rank or lower, there are no import cycles, the model and the caches do not import each other,
and the bundle format imports no runtime code.

Every `import` counts, wherever it is: at the top, inside a function (a lazy import is still a dependency)
and under `if TYPE_CHECKING:` (the annotation still ties the two modules together). Importing a submodule
also runs its package's `__init__`, so `a.b.c` depends on what `a/b/__init__.py` imports when it runs
(its module-level imports outside `TYPE_CHECKING`), unless the importer lives in that package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"xqcli": ROOT / "xqcli", "xqcli.kernels": ROOT / "kernels"}

# Low to high; a module's rank is that of the longest entry it starts with ("xqcli" itself only exactly).
RANKS = {
    "xqcli": 0, "xqcli.errors": 0,
    "xqcli.config": 1, "xqcli.units": 1, "xqcli.fileio": 1, "xqcli.system": 1,
    "xqcli.kernels": 2,
    "xqcli.cache.spec": 3,
    "xqcli.sources": 4, "xqcli.bundle": 4, "xqcli.rope": 4, "xqcli.tokenizer": 4, "xqcli.texts": 4,
    "xqcli.model": 5, "xqcli.cache": 5,
    "xqcli.load": 6,
    "xqcli.convert": 7,
    "xqcli.engine": 8,
    "xqcli.readouts": 9, "xqcli.serve": 9, "xqcli.lmeval": 9, "xqcli.vllm_plugin": 9,
    "xqcli.commands": 10, "xqcli.cli": 10, "xqcli.__main__": 10,
}
# cache.spec is a leaf: errors and the quantizer (with what the quantizer itself imports).
SPEC_LEAF_MAY_IMPORT = {"xqcli", "xqcli.errors", "xqcli.kernels", "xqcli.kernels.quant",
                        "xqcli.kernels._common", "xqcli.kernels._triton"}
RUNTIME = ("xqcli.model", "xqcli.cache", "xqcli.load", "xqcli.convert", "xqcli.engine", "xqcli.readouts",
           "xqcli.commands", "xqcli.cli", "xqcli.__main__")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # file:line of the import statement
    via: str = ""  # the package whose __init__ brings the dependency in, for an implied edge

    def __str__(self) -> str:
        via = f" (via {self.via}/__init__)" if self.via else ""
        return f"{self.importer} -> {self.imported}{via}  [{self.where}]"


def module_files() -> dict[str, Path]:
    """Every module of the two source trees by its import name."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rank(module: str) -> int | None:
    matches = [p for p in RANKS if (module == p if p == "xqcli" else _under(module, p))]
    return RANKS[max(matches, key=len)] if matches else None


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The xqcli modules one import statement (or literal importlib.import_module call) names."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
        names = [node.args[0].value]
    for name in names:
        if _under(name, "xqcli"):
            while name not in known and "." in name:  # `import a.b.c` where c is an attribute
                name = name.rsplit(".", 1)[0]
            yield name


def _runs_on_import(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements a module executes when imported: its top level, outside `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _runs_on_import(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            yield node
            for block in ("body", "orelse", "finalbody"):
                yield from _runs_on_import(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _runs_on_import(handler.body)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node


def import_edges() -> list[Edge]:
    """Every dependency between modules, implied package-__init__ edges included."""
    files = module_files()
    known = set(files)
    direct: dict[str, list[Edge]] = {m: [] for m in files}
    on_import: dict[str, list[Edge]] = {m: [] for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        eager = {id(n) for n in _runs_on_import(tree.body)}
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target != module:
                    edge = Edge(module, target, f"{path.relative_to(ROOT)}:{node.lineno}")
                    direct[module].append(edge)
                    if id(node) in eager:
                        on_import[module].append(edge)
    edges = [e for es in direct.values() for e in es]
    for e in list(edges):
        parts = e.imported.split(".")
        for i in range(2, len(parts)):
            package = ".".join(parts[:i])
            if _under(e.importer, package):
                continue  # the importer's own package: already running
            edges += [Edge(e.importer, p.imported, e.where, via=package) for p in on_import[package]
                      if p.imported != e.importer]
    first: dict[tuple[str, str, str], Edge] = {}
    for e in edges:  # one line per dependency: its first import statement
        first.setdefault((e.importer, e.imported, e.via), e)
    return sorted(first.values(), key=str)


def _report(title: str, bad: list[Edge] | list[str]) -> str:
    return f"{len(bad)} {title}:\n  " + "\n  ".join(map(str, bad))


def test_every_module_has_a_rank():
    unranked = [m for m in module_files() if rank(m) is None]
    assert not unranked, _report("modules missing from RANKS in tests/test_layers.py", unranked)


def test_imports_respect_the_ranks():
    bad = [e for e in import_edges() if (rank(e.imported) or 0) > (rank(e.importer) or 0)]
    lines = [f"{e}  rank {rank(e.importer)} -> {rank(e.imported)}" for e in bad]
    assert not bad, _report("imports of a higher rank (a module may import its own rank or lower)", lines)


def test_model_and_caches_do_not_import_each_other():
    def cache(m: str) -> bool:
        return _under(m, "xqcli.cache") and not _under(m, "xqcli.cache.spec")

    bad = [e for e in import_edges() if (e.importer == "xqcli.model" and cache(e.imported))
           or (cache(e.importer) and e.imported == "xqcli.model")]
    assert not bad, _report("imports between xqcli.model and xqcli.cache (the model declares the protocol it "
                            "calls; a cache gets its weights when it is built)", bad)


def test_bundle_imports_no_runtime_code():
    bad = [e for e in import_edges() if _under(e.importer, "xqcli.bundle")
           and any(_under(e.imported, r) for r in RUNTIME) and not _under(e.imported, "xqcli.cache.spec")]
    assert not bad, _report("imports of runtime code by the bundle format", bad)


def test_cache_spec_is_a_leaf():
    bad = [e for e in import_edges()
           if e.importer == "xqcli.cache.spec" and e.imported not in SPEC_LEAF_MAY_IMPORT]
    assert not bad, _report("imports by xqcli.cache.spec beyond errors and the quantizer", bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in module_files()}
    for e in import_edges():
        graph[e.importer].add(e.imported)
    cycles, state, stack = [], {}, []  # state: 1 on the DFS stack, 2 done

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, _report("import cycles", cycles)
