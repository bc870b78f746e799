"""The built documentation site: strict build, self-contained, every formula reaches the renderer.

The site is built once per run (``mkdocs build --strict``, warnings are errors) into a
temporary folder, then read as a browser would read it:

* nothing it loads for scripts, styles or fonts comes from another host, so the
  pages (and their maths) read the same offline; MathJax is part of the site
  (docs/hooks/offline_mathjax.py);
* no page leaves maths where MathJax will not look: arithmatex hands MathJax only
  the ``arithmatex`` elements (docs/javascripts/mathjax.js), so a TeX command or a
  ``\\[`` that Markdown turned into plain text (a display block with no blank line
  above it, say) would show as raw TeX. That is a failure here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, //host


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


class Page(HTMLParser):
    """Collects what a page loads, and its text outside code, scripts and maths."""

    SKIP = {"script", "style", "pre", "code", "svg", "textarea"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (tag, url) of scripts, styles, fonts, icons
        self.text: list[str] = []
        self.maths = 0
        self._stack: list[tuple[str, bool]] = []  # (tag, hides its text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.loads.append((tag, a["src"]))
        if tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & {
                "stylesheet", "preload", "modulepreload", "icon", "manifest", "font"}:
            self.loads.append((tag, a["href"]))
        if tag in {"link", "meta", "img", "br", "hr", "input", "source"}:
            return  # void elements: nothing to close
        classes = (a.get("class") or "").split()
        if "arithmatex" in classes:
            self.maths += 1
        hides = tag in self.SKIP or "arithmatex" in classes or "highlight" in classes
        self._stack.append((tag, hides))

    def handle_endtag(self, tag):
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data):
        if not any(h for _, h in self._stack):
            self.text.append(data)


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_site_builds_strict_and_lists_the_api(site):
    assert (site / "index.html").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'id="reflora(\.\w+)*\.lora_forward"', api), "the API page lost lora_forward"


def test_nothing_is_loaded_from_another_host(site):
    bad = []
    for page in pages(site):
        for tag, url in parse(page).loads:
            if EXTERNAL.match(url):
                bad.append(f"{page.relative_to(site)}: <{tag}> {url}")
            elif not url.startswith(("data:", "#")):
                path = url.split("?")[0].split("#")[0]
                target = (site / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
                if not target.exists():
                    bad.append(f"{page.relative_to(site)}: <{tag}> {url} is not in the site")
    for css in site.rglob("*.css"):
        for url in re.findall(r"""(?:url\(\s*['"]?|@import\s+['"])([^'")\s]+)""", css.read_text(encoding="utf-8")):
            if EXTERNAL.match(url):
                bad.append(f"{css.relative_to(site)}: {url}")
    assert not bad, "the site loads from elsewhere:\n" + "\n".join(bad[:20])


def test_mathjax_is_part_of_the_site_and_configured_first(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    cfg, mj = index.find("javascripts/mathjax.js"), index.find("javascripts/mathjax/tex-svg.js")
    assert 0 <= cfg < mj, "the MathJax configuration must load before MathJax itself"
    js = (site / "javascripts" / "mathjax" / "tex-svg.js")
    assert js.stat().st_size > 1_000_000 and b"MathJax" in js.read_bytes()
    assert (site / "javascripts" / "mathjax" / "input" / "tex" / "extensions" / "boldsymbol.js").is_file()


# Raw TeX in running text: a control word (\frac, \boxed, \mathrm ...) or an escaped bracket.
RAW_TEX = re.compile(r"\\(?:[A-Za-z]{2,}|[\[\]()])")


def test_every_formula_reaches_mathjax(site):
    bad, maths = [], 0
    for page in pages(site):
        p = parse(page)
        maths += p.maths
        text = " ".join(p.text)
        for m in RAW_TEX.finditer(text):
            bad.append(f"{page.relative_to(site)}: ...{text[max(0, m.start() - 40):m.end() + 40]!r}...")
    assert maths > 100, f"only {maths} formulas on the whole site: is arithmatex still enabled?"
    assert not bad, "maths MathJax will not render (raw TeX in the text):\n" + "\n".join(bad[:20])


def test_raw_tex_detector_catches_the_broken_display_block(tmp_path):
    # The defect this file guards against, in miniature: Markdown eats "\[" without a blank line.
    import markdown

    md = markdown.Markdown(extensions=["pymdownx.arithmatex"], extension_configs={"pymdownx.arithmatex": {"generic": True}})
    broken = md.convert("**The ratio.**\n\\[\n\\frac{a}{b}\n\\]\n")
    fixed = md.reset().convert("**The ratio.**\n\n\\[\n\\frac{a}{b}\n\\]\n")
    for html, n_raw in ((broken, 1), (fixed, 0)):
        f = tmp_path / "p.html"
        f.write_text(html, encoding="utf-8")
        p = parse(f)
        assert (len(RAW_TEX.findall(" ".join(p.text))) > 0) == bool(n_raw), html
