"""The package layout cannot rot: the import rule of docs/architecture.md, checked on the source.

Every ``reflora`` module is parsed with ``ast`` (nothing is imported), and its
imports of other reflora modules, lazy ones inside functions included, are
checked against ``MAY_IMPORT``: each folder (layer) lists the folders it may
import from. Also checked: no private name (``_x``, not a dunder) is imported
from another module except from ``reflora._validate``, and no module is over
``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reflora"
MAX_LINES = 400

#: The layers, lowest first. "base" is the top-level modules other than adapter.py and
#: the package's __init__/__main__ (which may import everything); each layer may import
#: from the layers it lists (and from itself).
BASE = ("reflora._errors", "reflora._validate", "reflora.backend", "reflora.config")
MAY_IMPORT = {
    "base": {"base"},
    "numerics": {"base"},
    "ops": {"base", "numerics"},
    "optim": {"base", "numerics"},
    "adapter": {"base", "numerics", "ops", "optim"},
    "arithmetic": {"base", "numerics", "ops", "adapter"},
    "serving": {"base", "numerics", "ops", "arithmetic", "adapter"},
    "io": {"base", "numerics", "ops", "optim", "adapter", "progress"},
    "testing": {"base", "numerics", "ops", "optim", "arithmetic", "adapter", "serving", "io"},
    "cli": {"base", "numerics", "ops", "optim", "arithmetic", "adapter", "serving", "io", "testing", "progress", "top"},
    "progress": set(),  # reflora.cli.progress: stdlib only, so io's merge_model may draw its bar
    "top": {"base", "numerics", "ops", "optim", "arithmetic", "adapter", "serving", "io", "testing", "cli",
            "progress"},
}

#: Known violations inside reflora/testing/, whose split (tolerance -> emulation + policy,
#: checks) is another change; each entry must still be a violation (so it is removed when fixed).
PENDING: set = set()  # none left: the kit's split (issue 10) landed


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        yield name, is_pkg, path


def _layer(module: str) -> str:
    if module in ("reflora", "reflora.__main__"):
        return "top"
    if module == "reflora.cli.progress":
        return "progress"
    if module in BASE:
        return "base"
    parts = module.split(".")
    if parts[1] == "adapter":
        return "adapter"
    return parts[1]


def _imports(name: str, is_pkg: bool, path: Path):
    """(target module, imported names) for every reflora import in the file, lazy ones included."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "reflora":
                    yield a.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "reflora":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if _is_module(sub):  # "from . import x" / "from reflora.io import safetensors": a module
                    yield sub, ()
                else:
                    yield target, (a.name,)


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _violations():
    found = set()
    messages = {}
    known_layers = set(MAY_IMPORT)
    for name, is_pkg, path in _modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            key = ("lines", name)
            found.add(key)
            messages[key] = f"{name} has {lines} lines; expected at most {MAX_LINES} (split it)"
        layer = _layer(name)
        if layer not in known_layers:
            key = ("layer", name)
            found.add(key)
            messages[key] = (f"{name} is in folder {layer!r}, which the import rule does not know; expected one "
                             f"of {sorted(known_layers)} (add the folder to MAY_IMPORT and docs/architecture.md)")
            continue
        for target, names in _imports(name, is_pkg, path):
            if target == "reflora" and names == ("__version__",):
                continue  # the version string, read lazily by testing.golden
            t_layer = _layer(target)
            if t_layer != layer and t_layer not in MAY_IMPORT[layer]:
                key = ("layer", name, target)
                found.add(key)
                messages[key] = (f"{name} ({layer}) imports {target} ({t_layer}); {layer} may import only "
                                 f"{sorted(MAY_IMPORT[layer] | {layer})}")
            for n in names:
                private = n.startswith("_") and not (n.startswith("__") and n.endswith("__"))
                if private and target != "reflora._validate" and target != name:
                    key = ("private", name, f"{target}.{n}")
                    found.add(key)
                    messages[key] = (f"{name} imports the private name {n} from {target}; expected only "
                                     "reflora._validate's private names to cross modules (make it public there, "
                                     "or move it to reflora._validate)")
    return found, messages


def test_every_import_follows_the_layer_rule_and_no_module_is_too_long():
    found, messages = _violations()
    new = sorted(found - PENDING)
    assert not new, "\n".join(messages[k] for k in new)


def test_the_pending_list_holds_only_live_violations():
    found, _ = _violations()
    stale = sorted(PENDING - found)
    assert not stale, f"fixed, so remove from PENDING in tests/test_architecture.py: {stale}"


@pytest.mark.parametrize("source, expected", [
    ("from ..io.safetensors import load_tensors\n", ("layer", "reflora.ops.fake", "reflora.io.safetensors")),
    ("def f():\n    from reflora.cli import main\n", ("layer", "reflora.ops.fake", "reflora.cli")),
    ("from ..numerics.merge import _add_lowrank\n", ("private", "reflora.ops.fake",
                                                     "reflora.numerics.merge._add_lowrank")),
    ("x = 1\n" * (MAX_LINES + 1), ("lines", "reflora.ops.fake")),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, monkeypatch, source, expected):
    # a planted module in a copy of the rule's view: the checker must report it
    fake = PACKAGE / "ops" / "fake.py"
    real_modules = list(_modules())

    def with_fake():
        planted = tmp_path / "fake.py"
        planted.write_text(source)
        yield from real_modules
        yield "reflora.ops.fake", False, planted

    monkeypatch.setattr(sys.modules[__name__], "_modules", with_fake)
    found, messages = _violations()
    assert expected in found, sorted(found - PENDING)
    assert not fake.exists()


def test_allowed_imports_are_not_reported():
    # the rule is not vacuous the other way either: the real tree has lower-layer imports aplenty
    found, _ = _violations()
    edges = [(n, t) for n, p, path in _modules() for t, _ in _imports(n, p, path)]
    assert any(_layer(n) == "io" and _layer(t) == "ops" for n, t in edges)
    assert not any(k[0] == "layer" and k[1].startswith("reflora.io.") and ".ops." in k[2] for k in found)
