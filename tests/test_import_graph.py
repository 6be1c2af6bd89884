"""The package's import graph, read from the source (``ast``; nothing is imported).

Every module of ``reft_kernels`` (found with ``pkgutil`` over the package's folders) is parsed and
each ``import`` / ``from ... import`` of a package module is collected, relative imports resolved,
as one of:

- module level: runs when the module is imported (class bodies, ``try`` and plain ``if`` blocks
  included; ``if TYPE_CHECKING:`` blocks excluded, they never run);
- function level: inside a ``def`` or ``lambda``, runs when the function is called.

``from P import name`` imports the submodule ``P.name`` when there is one, else reads ``name``
from ``P``'s ``__init__``. Importing a module also runs every package above it that is not above
the importer already (those are initialised before the importer's own code runs).

Checked: no cycle among module-level imports (a cycle makes the import order decide whether a
name exists yet), and no function-level import outside the Hugging Face layer that would close a
cycle if it moved to module level: such an import exists only to dodge the cycle (as
``triton_impl`` once did with ``triton_fwd_resident`` and ``triton_small_n``, which imported its
jit helpers; the three now share ``triton_common``). The Hugging Face layer (``reft_kernels.hf``)
is left out of that second check: its lazy imports between attach, adapters, merge, io and
shared_rotation are that layer's own design.
"""
from __future__ import annotations

import ast
import dataclasses
import pkgutil
from pathlib import Path

import pytest

import reft_kernels

# Where a function-level import that dodges a cycle does not fail the test (see the docstring).
LENIENT_PREFIXES = ("reft_kernels.hf",)


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name of the package module imported (or whose __init__ is read)
    line: int
    function: str | None  # enclosing function, None at module level


def package_modules(name: str, path: list) -> dict:
    """``{dotted name: (source file or None, is_package)}`` for the package ``name`` at ``path``
    and every module below it, found with ``pkgutil.iter_modules`` folder by folder (nothing is
    imported). A compiled extension (``_C``) has no source: it imports no package module."""
    out = {name: (Path(path[0]) / "__init__.py", True)}
    for info in pkgutil.iter_modules(path):
        full = f"{name}.{info.name}"
        folder = Path(info.module_finder.path)
        if info.ispkg:
            out.update(package_modules(full, [str(folder / info.name)]))
        else:
            source = folder / f"{info.name}.py"
            out[full] = (source if source.exists() else None, False)
    return out


def _resolve_base(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute dotted name of ``from <level dots><module> import ...`` in ``importer``."""
    if level == 0:
        return module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top package in {importer}")
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node, function):
    """(import node, enclosing function name or None) for every import under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, function
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(child, function or child.name)
        elif isinstance(child, ast.Lambda):
            yield from _walk(child, function or "<lambda>")
        elif isinstance(child, ast.If) and function is None and _is_type_checking(child.test):
            for stmt in child.orelse:  # the else branch runs; the TYPE_CHECKING body never does
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), function)
        else:
            yield from _walk(child, function)


def collect_imports(modules: dict) -> list:
    """Every import of a module of ``modules`` by a module of ``modules``, as ``Import``s. A
    target is the module itself plus the packages above it that are not above the importer."""
    out = []
    for importer, (file, is_package) in sorted(modules.items()):
        if file is None:
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node, function in _walk(tree, None):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_base(importer, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                for name in _with_parents(target, importer, is_package):
                    if name in modules and name != importer:
                        out.append(Import(importer, name, node.lineno, function))
    return out


def _with_parents(target: str, importer: str, is_package: bool) -> list:
    """``target`` and the packages above it that importing it runs: not those above (or equal to,
    for a package) the importer, which are initialised before the importer runs."""
    own = importer.split(".")
    own = own if is_package else own[:-1]
    initialised = {".".join(own[:i]) for i in range(1, len(own) + 1)}
    parts = target.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts))] + [target]
    return [n for n in names if n not in initialised or n == target]


def graph(imports, function_level: bool = False) -> dict:
    """``{module: set of modules it imports}`` from the module-level imports (and the
    function-level ones too with ``function_level``)."""
    out = {}
    for imp in imports:
        if imp.function is None or function_level:
            out.setdefault(imp.importer, set()).add(imp.target)
    return out


def cycles(edges: dict) -> list:
    """The strongly connected components of more than one module, or of one module importing
    itself (Tarjan's algorithm), each as a sorted list, the list sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})

    def visit(v):  # recursion depth is bounded by the module count (~70)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(out)


def reaches(edges: dict, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        if v not in seen:
            seen.add(v)
            todo.extend(edges.get(v, ()))
    return False


def cycle_dodges(imports) -> list:
    """The function-level imports ``A -> B`` where ``B`` already reaches ``A`` through
    module-level imports: at module level they would close a cycle."""
    edges = graph(imports)
    return [imp for imp in imports if imp.function is not None and reaches(edges, imp.target, imp.importer)]


@pytest.fixture(scope="module")
def package_imports():
    return collect_imports(package_modules("reft_kernels", list(reft_kernels.__path__)))


def test_walks_the_whole_package(package_imports):
    modules = package_modules("reft_kernels", list(reft_kernels.__path__))
    root = Path(reft_kernels.__file__).parent
    on_disk = {p for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    assert {file for file, _ in modules.values() if file is not None} == on_disk
    importers = {imp.importer for imp in package_imports}
    assert "reft_kernels.ops.lowrank_edit.triton_impl" in importers
    assert Import("reft_kernels.ops.lowrank_edit.function", "reft_kernels.ops.lowrank_edit.triton_impl",
                  _line_of(modules, "reft_kernels.ops.lowrank_edit.function", "import cuda_impl"), None) \
        in package_imports


def _line_of(modules, name, text):
    lines = modules[name][0].read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def test_no_module_level_import_cycle(package_imports):
    assert cycles(graph(package_imports)) == []


def test_no_function_level_import_dodges_a_cycle(package_imports):
    dodges = [imp for imp in cycle_dodges(package_imports) if not imp.importer.startswith(LENIENT_PREFIXES)]
    assert dodges == []


def test_triton_files_share_only_triton_common(package_imports):
    """``triton_fwd_resident`` and ``triton_small_n`` take the shared jit code from ``triton_common``,
    which imports none of its siblings; ``triton_impl`` imports the other two at module level."""
    pkg = "reft_kernels.ops.lowrank_edit."
    triton_files = {pkg + n for n in ("triton_common", "triton_impl", "triton_fwd_resident", "triton_small_n")}
    edges = {(i.importer, i.target, i.function is None) for i in package_imports
             if i.importer in triton_files and i.target in triton_files}
    assert edges == {
        (pkg + "triton_impl", pkg + "triton_common", True),
        (pkg + "triton_impl", pkg + "triton_fwd_resident", True),
        (pkg + "triton_impl", pkg + "triton_small_n", True),
        (pkg + "triton_fwd_resident", pkg + "triton_common", True),
        (pkg + "triton_small_n", pkg + "triton_common", True),
    }


# ----------------------------------------------------------------------------- the checks can fail


def _tiny_package(root: Path, files: dict) -> tuple[str, list]:
    for rel, text in files.items():
        path = root / "tiny" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return "tiny", [str(root / "tiny")]


def test_finds_a_cycle_through_relative_imports(tmp_path):
    name, path = _tiny_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..sub.c import f\n",
        "sub/c.py": "from .. import a\ndef f():\n    pass\n",
        "d.py": "import tiny.a\n",
    })
    imports = collect_imports(package_modules(name, path))
    assert cycles(graph(imports)) == [["tiny.a", "tiny.sub.b", "tiny.sub.c"]]


def test_function_level_import_is_no_cycle_but_a_dodge(tmp_path):
    name, path = _tiny_package(tmp_path, {
        "__init__.py": "",
        "impl.py": "def run():\n    from . import helper\n    return helper.X\nY = 1\n",
        "helper.py": "from .impl import Y\nX = Y\n",
        "other.py": "def g():\n    from .helper import X\n    return X\n",
    })
    imports = collect_imports(package_modules(name, path))
    assert cycles(graph(imports)) == []
    assert cycles(graph(imports, function_level=True)) == [["tiny.helper", "tiny.impl"]]
    assert [(i.importer, i.target, i.function) for i in cycle_dodges(imports)] == [("tiny.impl", "tiny.helper", "run")]


def test_package_init_names_and_type_checking(tmp_path):
    """``from P import name`` of a name defined in ``P/__init__`` depends on ``P``; a package's
    ``__init__`` importing its own submodule that reads the package's names is a cycle; an import
    under ``if TYPE_CHECKING:`` is none."""
    name, path = _tiny_package(tmp_path, {
        "__init__.py": "from .m import K\nZ = 0\n",
        "m.py": "from . import Z\nK = Z\n",
        "t.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .u import V\nelse:\n    V = 1\n",
        "u.py": "from .t import V\n",
    })
    imports = collect_imports(package_modules(name, path))
    assert cycles(graph(imports)) == [["tiny", "tiny.m"]]
    assert ("tiny.t", "tiny.u") not in {(i.importer, i.target) for i in imports}


def test_importing_a_module_runs_the_packages_above_it(tmp_path):
    """``import tiny.p.q`` from ``tiny.x`` runs ``tiny/p/__init__``: a cycle when that imports
    ``tiny.x``."""
    name, path = _tiny_package(tmp_path, {
        "__init__.py": "",
        "x.py": "from .p.q import W\n",
        "p/__init__.py": "from .. import x\n",
        "p/q.py": "W = 1\n",
    })
    imports = collect_imports(package_modules(name, path))
    assert cycles(graph(imports)) == [["tiny.p", "tiny.x"]]
