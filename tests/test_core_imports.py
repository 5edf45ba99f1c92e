"""The core never imports a plugin (DESIGN.md §1): checked on the source with ``ast``, not by running it."""

import ast
from pathlib import Path

import qsmkit

CORE = Path(qsmkit.__file__).parent


def _plugin_imports(path: Path, root: Path = CORE.parent) -> list[str]:
    """``file:line module`` for every import of a ``qsmkit_*`` module in ``path`` (any scope)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call):  # importlib.import_module("qsmkit_x") / __import__("qsmkit_x")
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
        found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names
                  if n.split(".")[0].startswith("qsmkit_")]
    return found


def test_core_does_not_import_plugins():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10
    offenders = [hit for f in files for hit in _plugin_imports(f)]
    assert offenders == [], "the core imports plugin modules: " + ", ".join(offenders)


def test_the_checker_finds_imports(tmp_path):
    src = ("import qsmkit_tkd\nfrom qsmkit_kspace.sense import x\nfrom .kspace import KSpaceData\nimport importlib\n"
           "def f():\n    import qsmkit_medi as m\n    importlib.import_module('qsmkit_dip')\n")
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    hits = _plugin_imports(probe, tmp_path)
    assert [h.split()[-1] for h in hits] == ["qsmkit_tkd", "qsmkit_kspace.sense", "qsmkit_medi", "qsmkit_dip"]
