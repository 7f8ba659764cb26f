"""The shape of the import graph of ``src/moeforge``: no cycles, no private names borrowed across modules,
and the layering docs/ARCHITECTURE.md describes (``data → tokens → model → train → eval/serve``, nothing
downstream reaching back upstream).

Every import counts: module level and function-local, absolute and relative, and those under
``if TYPE_CHECKING:`` (a dependency the type checker sees is still a dependency of the design).

And a module is either code or a package's public face, never both: outside ``__init__.py``, every name a
module lists in ``__all__`` is one it defines, so each name has one module to import it from.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "moeforge"


@dataclass(frozen=True)
class Source:
    text: str
    is_package: bool  # an ``__init__.py``: relative imports resolve against the module itself
    path: str  # for messages


@dataclass(frozen=True)
class Edge:
    importer: str
    target: str  # a module of the tree
    name: str | None  # the attribute taken by ``from target import name``; None for a module import
    where: str  # path:line


def load_tree(src: Path = SRC, root: str = ROOT) -> dict[str, Source]:
    """Every module under ``src/root`` by dotted name."""
    tree: dict[str, Source] = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        tree[".".join(parts)] = Source(
            path.read_text(encoding="utf-8"), is_package, str(path.relative_to(src))
        )
    return tree


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base.pop()
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def collect_edges(tree: dict[str, Source], root: str = ROOT) -> list[Edge]:
    """Every import of a module of ``tree`` by a module of ``tree``.

    ``from pkg import x`` is an edge to ``pkg.x`` when that is a module, else to ``pkg`` taking name ``x``.
    ``import pkg.sub`` is an edge to ``pkg.sub`` only (the parent package's ``__init__`` runs too, but an
    edge there would make every package a cycle with its own submodules).
    """
    edges: list[Edge] = []
    for module, src in tree.items():
        for node in ast.walk(ast.parse(src.text, filename=src.path)):
            where = f"{src.path}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == root or alias.name.startswith(root + "."):
                        target = alias.name
                        while target not in tree and "." in target:
                            target = target.rsplit(".", 1)[0]
                        edges.append(Edge(module, target, None, where))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _resolve_relative(module, src.is_package, node.level, node.module)
                else:
                    base = node.module or ""
                if not (base == root or base.startswith(root + ".")):
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in tree:
                        edges.append(Edge(module, f"{base}.{alias.name}", None, where))
                    else:
                        edges.append(Edge(module, base, alias.name, where))
    return edges


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ""


def private_imports(edges: list[Edge]) -> list[str]:
    """Private names taken from another module, and private modules imported from outside their package.

    ``from pkg.mod import _x`` is allowed only in ``pkg.mod`` itself (a package's ``__init__`` is a module
    of its own: it may not take its submodules' private names either). A private module such as
    ``cli/_util.py`` is the package's own helper: siblings and their subpackages may import it, nothing
    outside the package may.
    """
    found = []
    for e in edges:
        if e.name is not None and _private(e.name) and e.importer != e.target:
            found.append(f"{e.where}: {e.importer} imports private name {e.name!r} from {e.target}")
        parts = e.target.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])  # the package the private module belongs to
            if _private(part) and not (e.importer == owner or e.importer.startswith(owner + ".")):
                found.append(
                    f"{e.where}: {e.importer} imports private module {e.target} from outside {owner}"
                )
                break
    return found


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.importer].add(e.target)
    return graph


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (iterative Tarjan), each sorted; only those that contain a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    out.append(sorted(comp))
    return sorted(out)


def _shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """The shortest path start → … → start inside one component (breadth-first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ()) & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a component without a cycle through it")


def import_cycles(edges: list[Edge]) -> list[str]:
    """One message per group of modules that import each other, with one cycle's path and its import lines."""
    graph = _graph(edges)
    where: dict[tuple[str, str], str] = {}
    for e in edges:
        where.setdefault((e.importer, e.target), e.where)
    found = []
    for comp in _components(graph):
        path = _shortest_cycle(graph, comp[0], set(comp))
        steps = "\n".join(f"    {a} → {b}  ({where[a, b]})" for a, b in pairwise(path))
        found.append(
            f"import cycle {' → '.join(path)} (modules in the cycle group: {', '.join(comp)}):\n{steps}"
        )
    return found


# ---- the layering of docs/ARCHITECTURE.md ----

# the helpers every package uses; they use none. storage/ is fsspec: listing, verified upload and download
_FOUNDATION = ("config", "io", "procs", "faults", "storage")
_PACKAGES = ("data", "tokens", "model", "train", "eval", "serve", "harness", "cli")
_TOP_LEVEL = ("pretrained", "export", "demo", "curriculum")

# area → the areas it must never import. An area is a subpackage or a top-level module of moeforge.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    **{f: _PACKAGES + _TOP_LEVEL for f in _FOUNDATION},
    # data → tokens → model → train → eval/serve: each stage reads what the one before it wrote.
    "data": ("tokens", "model", "train", "eval", "serve", "cli", *_TOP_LEVEL),
    "tokens": ("model", "train", "eval", "serve", "cli", *_TOP_LEVEL),
    "model": ("data", "tokens", "train", "eval", "serve", "cli", *_TOP_LEVEL),
    # train reads token shards, never records; pretrained.py builds on train/checkpoint.py, not the reverse
    "train": ("data", "eval", "serve", "harness", "cli", "pretrained", "export", "demo"),
    "serve": ("data", "train", "eval", "harness", "cli", "export", "demo"),
    "eval": ("serve", "cli", "export", "demo"),
    # lm-eval's client: the engine (serve) and checkpoints (train/checkpoint.py), never the pipeline; the
    # demo and the emergence study (eval/) score through it
    "harness": ("data", "eval", "cli", "export", "demo"),
    "pretrained": ("data", "eval", "serve", "harness", "cli", "export", "demo"),
    # export loads a checkpoint through serve's Engine (its loading and vocabulary checks), so it may use serve
    "export": ("data", "eval", "harness", "cli", "demo"),
    "demo": ("serve", "cli", "export"),
    # the curriculum chains data, pair sampling (serve's engine), training and evaluation runs; it is
    # driven by the command line
    "curriculum": ("cli", "export", "demo"),
}
# Only the command line (and ``python -m moeforge``) may import the command line.
CLI_IMPORTERS = ("cli", "__main__")


def area(module: str, root: str = ROOT) -> str:
    """``moeforge.tokens.pack`` → ``tokens``; ``moeforge.io`` → ``io``; ``moeforge`` → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == root else ""


def layering_violations(
    edges: list[Edge],
    forbidden: dict[str, tuple[str, ...]] = FORBIDDEN,
    cli_importers: tuple[str, ...] = CLI_IMPORTERS,
    root: str = ROOT,
) -> list[str]:
    found: dict[str, None] = {}  # ordered and without the repeats of one line importing several names
    for e in edges:
        src, dst = area(e.importer, root), area(e.target, root)
        if src == dst:
            continue
        if dst in forbidden.get(src, ()):
            found[f"{e.where}: {e.importer} ({src}) imports {e.target} ({dst}), which {src} must not"] = None
        elif dst == "cli" and src not in cli_importers:
            found[f"{e.where}: {e.importer} imports {e.target}; only cli/ and __main__ import cli/"] = None
    return list(found)


def area_cycles(edges: list[Edge], root: str = ROOT) -> list[str]:
    """Cycles between areas (subpackages and top-level modules), whatever the table above says."""
    lifted = [Edge(area(e.importer, root), area(e.target, root), None, e.where) for e in edges]
    return import_cycles([e for e in lifted if e.importer != e.target])


# ---- only a package's __init__ re-exports ----


def _bound_names(target: ast.expr) -> set[str]:
    """The names an assignment target binds: ``x``, ``a, b``, ``[a, *rest]`` (not ``obj.x`` or ``d[k]``)."""
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return {n for elt in target.elts for n in _bound_names(elt)}
    return set()


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run in the module's own namespace: its body and the blocks of its top-level
    ``if``/``try``/``with``/``for``/``while``, never the bodies of its functions or classes."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.Try | ast.TryStar):
            blocks = [node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody]
        elif isinstance(node, ast.If | ast.For | ast.AsyncFor | ast.While):
            blocks = [node.body, node.orelse]
        elif isinstance(node, ast.With | ast.AsyncWith):
            blocks = [node.body]
        else:
            blocks = []
        for block in blocks:
            out.extend(_module_level(block))
    return out


def defined_names(module: ast.Module) -> set[str]:
    """The names a module defines at module level: ``def``, ``class`` and assignments — not imports."""
    names: set[str] = set()
    for node in _module_level(module.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(n for t in node.targets for n in _bound_names(t))
        elif isinstance(node, ast.AnnAssign | ast.AugAssign | ast.For | ast.AsyncFor):
            names.update(_bound_names(node.target))
        elif isinstance(node, ast.With | ast.AsyncWith):
            names.update(
                n for item in node.items if item.optional_vars for n in _bound_names(item.optional_vars)
            )
    return names


def _imported_from(module: ast.Module, name: str, path: str, source: Source) -> str | None:
    """Where the module's own import of ``name`` takes it from, for the message; None if it does not import it."""
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    base = (
                        _resolve_relative(path, source.is_package, node.level, node.module)
                        if node.level
                        else node.module or ""
                    )
                    return base if alias.name == name else f"{base} (as {alias.name!r})"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.asname or alias.name.split(".")[0]) == name:
                    return alias.name
    return None


def reexports(tree: dict[str, Source]) -> list[str]:
    """Names in a non-``__init__`` module's ``__all__`` that the module does not define itself.

    Such a module re-exports what it imports, so a name has two homes and importers drift to the wrong
    one; only a package's ``__init__`` is a public face. An ``__all__`` that is not a literal list or tuple
    of strings cannot be checked and is reported too.
    """
    found = []
    for module, src in tree.items():
        if src.is_package:
            continue
        parsed = ast.parse(src.text, filename=src.path)
        listed: list[tuple[str, int]] = []
        for node in _module_level(parsed.body):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                continue
            value = node.value
            if not (
                isinstance(value, ast.List | ast.Tuple)
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts)
            ):
                found.append(f"{src.path}:{node.lineno}: {module}.__all__ is not a literal list of strings")
                continue
            listed.extend((e.value, node.lineno) for e in value.elts)  # type: ignore[attr-defined]
        defined = defined_names(parsed)
        for name, line in listed:
            if name in defined:
                continue
            origin = _imported_from(parsed, name, module, src)
            how = f"imports it from {origin}; import it from there" if origin else "never defines it"
            found.append(f"{src.path}:{line}: {module} lists {name!r} in __all__ but {how}")
    return found


def _report(title: str, problems: list[str]) -> str:
    return f"{len(problems)} {title}:\n" + "\n".join(problems)


# ---- the checks on the real tree ----


def test_no_import_cycles() -> None:
    cycles = import_cycles(collect_edges(load_tree()))
    assert not cycles, _report("import cycle group(s) in src/moeforge", cycles)


def test_no_private_imports_across_modules() -> None:
    found = private_imports(collect_edges(load_tree()))
    assert not found, _report(
        "private import(s) across modules — make the name public where it belongs, or move the code", found
    )


def test_layering_follows_architecture() -> None:
    found = layering_violations(collect_edges(load_tree()))
    assert not found, _report("import(s) against the layering of docs/ARCHITECTURE.md", found)


def test_areas_form_layers() -> None:
    cycles = area_cycles(collect_edges(load_tree()))
    assert not cycles, _report(
        "cycle(s) between areas of src/moeforge (two layers that need each other)", cycles
    )


def test_only_packages_reexport() -> None:
    found = reexports(load_tree())
    assert not found, _report(
        "name(s) in a module's __all__ that it does not define — a module that is not an __init__.py "
        "lists only its own names; importers take an imported name from the module that defines it",
        found,
    )


def test_every_area_named_in_the_rules_exists() -> None:
    """A renamed package must not silently empty a rule."""
    areas = {area(m) for m in load_tree()}
    named = set(FORBIDDEN) | {a for v in FORBIDDEN.values() for a in v} | set(CLI_IMPORTERS)
    assert named <= areas, f"rules name areas that do not exist: {sorted(named - areas)}"


# ---- the checker itself, on a synthetic tree, so the checks above cannot pass vacuously ----


def _build(files: dict[str, str]) -> dict[str, Source]:
    tree = {}
    for path, text in files.items():
        parts = path[: -len(".py")].split("/")
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        tree[".".join(parts)] = Source(text, is_package, path)
    return tree


def _synthetic() -> dict[str, Source]:
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": "def helper():\n    from . import c  # function-local, relative\n    return c\n",
        "pkg/c.py": "import pkg.a\n_SECRET = 1\n",
        "pkg/d.py": "from .c import _SECRET\nfrom pkg.sub import _tool\n",
        "pkg/sub/__init__.py": "from ._impl import _hidden\nfrom . import _tool\n",
        "pkg/sub/_impl.py": "_hidden = 2\n",
        "pkg/sub/_tool.py": "from pkg.sub._impl import VALUE\n",
        "pkg/low/__init__.py": "",
        "pkg/low/x.py": "def f():\n    from ..high import y\n    return y\n",
        "pkg/high/__init__.py": "",
        "pkg/high/y.py": "from pkg.low import x\n",
        "pkg/cli/__init__.py": "",
        "pkg/cli/main.py": "from pkg.low.x import f\n",
        "pkg/__main__.py": "from pkg.cli.main import f\n",
        "pkg/e.py": "from pkg.cli import main\n",
    }
    return _build(files)


def test_checker_resolves_every_kind_of_import() -> None:
    edges = {(e.importer, e.target, e.name) for e in collect_edges(_synthetic(), root="pkg")}
    assert ("pkg.a", "pkg.b", "helper") in edges  # absolute from-import of a name
    assert ("pkg.b", "pkg.c", None) in edges  # relative, function-local, of a module
    assert ("pkg.c", "pkg.a", None) in edges  # plain import
    assert ("pkg.d", "pkg.c", "_SECRET") in edges  # relative from-import of a name
    assert ("pkg.sub", "pkg.sub._impl", "_hidden") in edges  # relative inside a package's __init__
    assert ("pkg.low.x", "pkg.high", "y") not in edges and ("pkg.low.x", "pkg.high.y", None) in edges


def test_checker_reports_a_cycle_with_its_path() -> None:
    cycles = import_cycles(collect_edges(_synthetic(), root="pkg"))
    assert len(cycles) == 2, cycles
    assert cycles[0].startswith("import cycle pkg.a → pkg.b → pkg.c → pkg.a "), cycles[0]
    assert "pkg/b.py:2" in cycles[0]  # the function-local import is the hidden edge, and it is named
    assert cycles[1].startswith("import cycle pkg.high.y → pkg.low.x → pkg.high.y "), cycles[1]


def test_checker_reports_private_imports() -> None:
    found = private_imports(collect_edges(_synthetic(), root="pkg"))
    assert len(found) == 3, found
    assert any("pkg.d imports private name '_SECRET' from pkg.c" in f for f in found)
    assert any("pkg.sub imports private name '_hidden' from pkg.sub._impl" in f for f in found)  # __init__
    assert any("pkg.d imports private module pkg.sub._tool from outside pkg.sub" in f for f in found)
    # pkg/sub/__init__ importing its own _tool, and _tool importing its sibling _impl, are fine.


def test_checker_reports_layering() -> None:
    found = layering_violations(
        collect_edges(_synthetic(), root="pkg"),
        forbidden={"low": ("high",)},
        cli_importers=("cli", "__main__"),
        root="pkg",
    )
    assert len(found) == 2, found
    assert any("pkg.low.x (low) imports pkg.high.y (high)" in f for f in found)
    assert any("pkg.e imports pkg.cli.main; only cli/" in f for f in found)
    cycles = area_cycles(collect_edges(_synthetic(), root="pkg"), root="pkg")
    # a, b and c are top-level modules of pkg, so areas of their own: their cycle is one between areas too
    assert len(cycles) == 2 and cycles[1].startswith("import cycle high → low → high "), cycles


def test_checker_reports_reexports() -> None:
    tree = _build(
        {
            # a package's public face may list what it imports
            "pkg/__init__.py": 'from pkg.own import run\n__all__ = ["run"]\n',
            # every way a module defines a name at module level, and none of them an import
            "pkg/own.py": (
                "import sys\n"
                "def run(): pass\n"
                "async def arun(): pass\n"
                "class Kind: pass\n"
                "LIMIT = 1\n"
                "SIZE: int = 2\n"
                "first, *rest = 1, 2, 3\n"
                "if sys.platform:\n    LATER = 3\nelse:\n    LATER = 4\n"
                "try:\n    import fast as _impl\nexcept ImportError:\n    FALLBACK = 5\n"
                '__all__ = ["run", "arun", "Kind", "LIMIT", "SIZE", "first", "rest", "LATER", "FALLBACK"]\n'
                '__all__ += ["LIMIT"]\n'
            ),
            # the planted violations
            "pkg/face.py": (
                "import os\n"
                "from pkg.own import Kind, run as start\n"
                "from .sub.deep import Deep\n"
                "def helper():\n    local = 1\n    return local\n"
                '__all__ = ["helper", "Kind", "start", "Deep", "os", "local"]\n'
                '__all__ += ["missing"]\n'
            ),
            "pkg/dyn.py": "__all__ = [name for name in dir()]\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/deep.py": 'class Deep: pass\n__all__ = ["Deep"]\n',
        }
    )
    found = reexports(tree)
    assert len(found) == 7, found
    assert (
        "pkg/face.py:7: pkg.face lists 'Kind' in __all__ but imports it from pkg.own; import it from there"
        in found
    )
    assert any("'start' in __all__ but imports it from pkg.own (as 'run')" in f for f in found)
    assert any("'Deep' in __all__ but imports it from pkg.sub.deep" in f for f in found)  # relative import
    assert any("'os' in __all__ but imports it from os" in f for f in found)
    assert any(
        "'local' in __all__ but never defines it" in f for f in found
    )  # function-local is not module level
    assert "pkg/face.py:8: pkg.face lists 'missing' in __all__ but never defines it" in found  # via +=
    assert any("pkg.dyn.__all__ is not a literal list of strings" in f for f in found)
