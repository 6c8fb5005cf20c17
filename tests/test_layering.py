"""The three layers (docs/architecture.md), enforced on the import statements.

1. math over ``xp``: imports only layer 1 (and NumPy/SciPy);
2. files and drivers: imports layers 1 and 2;
3. command lines: a parser and ``main`` each, through :mod:`mrc_ref.cli`.

Nothing imports a command module, ``mrc_ref`` never imports ``data_tools``,
no module of either package is part of an import cycle, and every module is
placed in a layer here (a new module must be placed before it lands). Every
import counts, at the top of a file or inside a function.
"""

import ast
import importlib.util
import os

import pytest

import data_tools
import mrc_ref
from helpers import command_modules

ROOTS = {"mrc_ref": os.path.dirname(os.path.abspath(mrc_ref.__file__)),
         "data_tools": os.path.dirname(os.path.abspath(data_tools.__file__))}

LAYER1 = {f"mrc_ref.{m}" for m in ("errors", "backend", "layout", "stats", "svd", "allocate", "compensate",
                                    "sequential", "vit", "threads", "quantize", "sensitivity", "metrics", "pipeline",
                                    "certificates")} | {"mrc_ref"}
LAYER2 = {
    *(f"mrc_ref.formats.{m}" for m in ("paths", "tensors", "acts", "compressed", "documents")), "mrc_ref.formats",
    "mrc_ref.images", "mrc_ref.example", "mrc_ref.progress", "mrc_ref.testing",
    "mrc_ref.compress", "mrc_ref.evaluate", "mrc_ref.verify", "mrc_ref.export",
    *(f"mrc_ref.report.{m}" for m in ("grid", "orchestration", "verdicts", "figures", "render")), "mrc_ref.report",
    *(f"mrc_ref.cases.{m}" for m in ("compare", "reference", "generate")), "mrc_ref.cases",
    *(f"data_tools.{m}" for m in ("capture", "merge", "distributed", "sensitivity", "convert", "synthetic")),
    "data_tools", "data_tools.images", "data_tools.example_data",
}
#: Layer 3 beside the command modules: the helpers they share.
LAYER3_HELPERS = {"mrc_ref.cli", "data_tools.capture.options"}
#: Old names kept for users; nothing of ours imports them.
OLD_NAMES = {"data_tools.images", "data_tools.example_data"}


def _module_name(path):
    for top, root in ROOTS.items():
        if path.startswith(root + os.sep):
            parts = [top, *os.path.relpath(path, root)[: -len(".py")].split(os.sep)]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def _modules():
    """``{module name: path}`` of every .py file of both packages."""
    out = {}
    for root in ROOTS.values():
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(name, path):
    """The modules of both packages that ``name`` imports (relative imports
    resolved; ``from p import x`` names ``p.x`` when that is a module)."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # import a.b.c of a function c: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
COMMANDS = set(command_modules())


def _layer(name):
    if name in LAYER1:
        return 1
    if name in LAYER2:
        return 2
    if name in COMMANDS or name in LAYER3_HELPERS:
        return 3
    return None


def test_every_module_has_a_layer():
    assert len(MODULES) > 40
    unplaced = sorted(n for n in MODULES if _layer(n) is None)
    assert not unplaced, "place these modules in a layer (tests/test_layering.py, docs/architecture.md): " + \
        ", ".join(unplaced)
    gone = sorted((LAYER1 | LAYER2 | LAYER3_HELPERS) - set(MODULES) - {"mrc_ref.export"})
    assert not gone, f"listed but missing: {gone}"


@pytest.mark.parametrize("layer", [1, 2])
def test_a_layer_imports_only_layers_below_or_its_own(layer):
    offenders = sorted(f"{n} imports {t} (layer {_layer(t)})" for n in MODULES if _layer(n) == layer
                       for t in GRAPH[n] if (_layer(t) or 3) > layer)
    assert not offenders, "\n".join(offenders)


def test_nothing_imports_a_command_module():
    offenders = sorted(f"{n} imports {t}" for n in MODULES for t in GRAPH[n] if t in COMMANDS)
    assert not offenders, "\n".join(offenders)


def test_command_modules_hold_a_parser_and_main_through_the_shared_helper():
    for name in COMMANDS:
        assert "mrc_ref.cli" in GRAPH[name], f"{name} does not use mrc_ref.cli"
        if name.startswith("mrc_ref."):
            with open(MODULES[name], encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            assert defined == {"build_parser", "main"}, f"{name} defines {sorted(defined)}"


def test_the_core_never_imports_data_tools_nor_the_old_names():
    offenders = sorted(f"{n} imports {t}" for n in MODULES for t in GRAPH[n]
                       if (n.startswith("mrc_ref") and t.startswith("data_tools")) or t in OLD_NAMES)
    assert not offenders, "\n".join(offenders)


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_is_part_of_an_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_checks_see_what_they_check(tmp_path):
    """The import parser resolves both import forms and relative imports, and
    the cycle finder finds a cycle: the tests above could not pass vacuously."""
    assert "mrc_ref.formats.tensors" in GRAPH["mrc_ref.formats"]  # from .tensors import …
    assert "mrc_ref.compress" in GRAPH["mrc_ref.compress.__main__"]  # from ..compress import …
    assert "mrc_ref.cli" in GRAPH["data_tools.capture.__main__"]  # from mrc_ref import cli
    assert "mrc_ref.certificates" in GRAPH["mrc_ref.testing"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("mrc_ref.svd") == 1 and _layer("mrc_ref.formats.acts") == 2 and _layer("mrc_ref.cli") == 3


def test_old_names_still_work():
    from data_tools import example_data, images
    from mrc_ref import example
    from mrc_ref import images as core_images

    assert images is core_images  # one module object: setting an attribute on either sets both
    assert example_data.WEIGHTS == example.WEIGHTS and os.path.isfile(example_data.WEIGHTS)
    for name in ("ACTS", "TEST_IMAGES", "CALIB_IMAGES", "EXAMPLE_DIR"):
        assert getattr(example_data, name) == getattr(example, name)
        assert os.path.exists(getattr(example, name)), name
    assert example.EXAMPLE_DIR.startswith(ROOTS["mrc_ref"])


def test_public_modules_declare_their_surface():
    """Every public module of mrc_ref has ``__all__``, and the package docstring
    lists every public module."""
    public = sorted(n for n in MODULES if n.startswith("mrc_ref") and not any(
        part.startswith("_") for part in n.split(".")[1:]) and n not in COMMANDS and n != "mrc_ref")
    missing = [n for n in public if not hasattr(importlib.import_module(n), "__all__")]
    assert not missing, f"no __all__: {missing}"
    doc = mrc_ref.__doc__
    unlisted = [n for n in public if n.count(".") == 1 and f"``{n.split('.')[1]}``" not in doc]
    assert not unlisted, f"not listed in mrc_ref's docstring: {unlisted}"
    assert importlib.util.find_spec("mrc_ref.cli") is not None
