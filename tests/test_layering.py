"""The packages depend one way: ``data_tools`` uses ``mrc_ref``, never the reverse."""

import ast
import os

import mrc_ref

CORE = os.path.dirname(os.path.abspath(mrc_ref.__file__))


def _imported_modules(path):
    """Every module name an ``import`` or ``from ... import`` of the file names
    (relative imports resolved against the package ``mrc_ref``)."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("mrc_ref." if node.level else "") + (node.module or "")


def _core_files():
    for root, dirs, files in os.walk(CORE):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
        yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


def test_no_core_module_imports_data_tools():
    files = list(_core_files())
    assert len(files) > 10
    offenders = sorted(f"{os.path.relpath(path, CORE)}: {name}" for path in files
                       for name in _imported_modules(path) if name.split(".")[0] == "data_tools")
    assert not offenders, "mrc_ref imports data_tools:\n" + "\n".join(offenders)


def test_parser_sees_both_import_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import data_tools.x\nfrom data_tools import y\nfrom . import z\ndef f():\n    import os\n")
    assert list(_imported_modules(probe)) == ["data_tools.x", "data_tools", "mrc_ref.", "os"]


def test_old_names_still_work():
    from data_tools import example_data, images
    from mrc_ref import example
    from mrc_ref import images as core_images

    assert images is core_images  # one module object: setting an attribute on either sets both
    assert example_data.WEIGHTS == example.WEIGHTS and os.path.isfile(example_data.WEIGHTS)
    for name in ("ACTS", "TEST_IMAGES", "CALIB_IMAGES", "EXAMPLE_DIR"):
        assert getattr(example_data, name) == getattr(example, name)
        assert os.path.exists(getattr(example, name)), name
    assert example.EXAMPLE_DIR.startswith(CORE)
