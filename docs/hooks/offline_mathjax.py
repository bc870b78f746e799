"""MkDocs hook: serve MathJax from the site itself, so the maths renders offline.

MathJax 3.2.2 (its official ``es5`` build) comes from the PyPI package
``django-static-mathjax`` (the ``docs`` extra; it installs a data-only package
``mathjax`` with no dependencies). At build time this hook adds to the site the
one combined component reflora's pages use, ``tex-svg.js`` (TeX input, SVG
output: glyphs are drawn as paths, so no font files are fetched), and the TeX
extensions its autoloader may ask for (``input/tex/extensions``), under
``javascripts/mathjax/``. Nothing is fetched at build time or at view time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File, Files

DEST = "javascripts/mathjax"
# What a page may load: the combined component, and what its autoloader and menu load lazily.
KEEP = ("tex-svg.js", "input/tex/extensions", "ui", "a11y")


def mathjax_root() -> Path:
    """The folder of MathJax's es5 build inside the installed package."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MathJax is missing: pip install -e '.[docs]' (it brings django-static-mathjax)")
    root = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if not (root / "tex-svg.js").is_file():
        raise RuntimeError(f"{root} holds no tex-svg.js; expected MathJax 3's es5 build there")
    return root


def on_files(files: Files, config, **kwargs) -> Files:
    root = mathjax_root()
    for item in KEEP:
        path = root / item
        for src in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            rel = src.relative_to(root).as_posix()
            files.append(File.generated(config, f"{DEST}/{rel}", abs_src_path=str(src)))
    return files
