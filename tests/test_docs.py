"""The documentation is tested: every Python block runs, printed output is checked, the site builds.

Rules for docs/**/*.md (see docs/index.md, "How these pages are checked"):

* every fenced block whose info string starts with ``python`` is executed;
  the blocks of one page run in order in one shared namespace, so a page
  reads top to bottom like a script;
* a fenced ``text`` block that follows a Python block (blank lines only in
  between) is that block's expected standard output, compared exactly after
  stripping trailing whitespace. The numeric checks print rounded or boolean
  results so floating-point noise cannot change them;
* blocks run with the repository root as working directory, and a line
  ``--8<-- "file"`` inside a fence includes ``docs/examples/file`` (as
  pymdownx.snippets does on the site), so a program shown from a file is the
  program that runs;
* ``mkdocs build --strict`` must succeed (warnings are errors: a broken link,
  an API object mkdocstrings cannot find, a page missing from the nav).

Also checked here: the README's test command appears verbatim in .ci/run, and
each derivation page keeps the layout formula -> derivation -> the function
that computes it -> a numeric check.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^\s`]*)(.*)$")
# pymdownx.snippets include lines (mkdocs.yml: base_path docs/examples), expanded as mkdocs expands them
SNIPPET = re.compile(r'^-{1,}8<-{1,}\s+"([^"]+)"\s*$')
SNIPPETS = DOCS / "examples"


class Block(NamedTuple):
    lang: str
    line: int  # 1-based line of the opening fence
    text: str


def fenced_blocks(path: Path) -> list[Block]:
    """Top-level fenced blocks of a Markdown file, in order, with what lies between them."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                blocks.append(Block("", i + 1, lines[i]))  # prose: separates a block from the next
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence[0] * len(fence)):
            inc = SNIPPET.match(lines[i])
            body.extend((SNIPPETS / inc.group(1)).read_text(encoding="utf-8").splitlines() if inc else [lines[i]])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start + 1}: unclosed code fence")
        blocks.append(Block(lang, start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


def python_blocks_with_output(path: Path) -> list[tuple[Block, Block | None]]:
    """(python block, the text block right after it or None) for every python block of a page."""
    blocks = fenced_blocks(path)
    out = []
    for k, b in enumerate(blocks):
        if b.lang.startswith("python"):
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            out.append((b, nxt if nxt is not None and nxt.lang == "text" else None))
    return out


def _rstrip_lines(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip("\n").splitlines())


def run_page(path: Path) -> int:
    """Run every Python block of one page in one namespace; return how many ran."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    namespace: dict = {"__name__": "__main__"}  # a page runs like a script
    pairs = python_blocks_with_output(path)
    cwd = os.getcwd()
    for block, expected in pairs:
        buf = io.StringIO()
        try:
            code = compile(block.text, f"{rel}:{block.line}", "exec")
            os.chdir(ROOT)  # blocks run from the repository root (paths like docs/examples/...)
            with contextlib.redirect_stdout(buf):
                exec(code, namespace)  # noqa: S102 - the docs are our own code
        except Exception:
            pytest.fail(f"{rel}, Python block at line {block.line} raised:\n{traceback.format_exc()}"
                        f"\nits output so far:\n{buf.getvalue()}", pytrace=False)
        finally:
            os.chdir(cwd)
        if expected is not None:
            got, want = _rstrip_lines(buf.getvalue()), _rstrip_lines(expected.text)
            assert got == want, (f"{rel}, Python block at line {block.line}: printed output differs from the "
                                 f"text block at line {expected.line}\n--- page says ---\n{want}\n--- code printed ---\n{got}")
    return len(pairs)


def test_pages_exist():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.md", "getting-started.md", "conventions.md", "api.md"} <= names, names


@pytest.mark.parametrize("path", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_python_blocks_run_and_print_what_the_page_says(path):
    run_page(path)


def test_collector_sees_blocks_and_catches_wrong_output(tmp_path):
    """The collector itself: a page whose printed output disagrees must fail."""
    page = tmp_path / "p.md"
    page.write_text("Text.\n\n```python\nx = 2\nprint(x + 1)\n```\n\n```text\n3\n```\n\n"
                    "Prose.\n\n```python\nprint(x * 10)\n```\n\nProse.\n\n```text\nnot an output\n```\n",
                    encoding="utf-8")
    pairs = python_blocks_with_output(page)
    assert [(b.line, e.text if e else None) for b, e in pairs] == [(3, "3\n"), (14, None)]
    assert run_page(page) == 2
    page.write_text(page.read_text().replace("```text\n3\n```", "```text\n4\n```"), encoding="utf-8")
    with pytest.raises(AssertionError, match="printed output differs"):
        run_page(page)
    page.write_text("```python\nraise ValueError('boom')\n```\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="boom"):
        run_page(page)


def test_every_page_has_python_or_is_reference():
    """Pages teach by running code; the API page is generated and the index only points."""
    for p in PAGES:
        rel = p.relative_to(DOCS).as_posix()
        if rel in ("api.md", "index.md"):
            continue
        assert python_blocks_with_output(p), f"docs/{rel} has no Python block"


DERIVATION_SECTIONS = ("## Formula", "## Derivation", "## Where reflora computes it", "## Numeric check")


@pytest.mark.parametrize("path", sorted((DOCS / "derivations").glob("*.md")),
                         ids=lambda p: p.name)
def test_derivation_pages_keep_the_layout(path):
    """formula -> derivation -> the function that computes it (a link) -> a numeric check that prints."""
    text = path.read_text(encoding="utf-8")
    heads = [line.strip() for line in text.splitlines() if line.startswith("## ")]
    pos = [heads.index(h) if h in heads else -1 for h in DERIVATION_SECTIONS]
    assert -1 not in pos and pos == sorted(pos), f"{path.name}: sections {heads}; expected {DERIVATION_SECTIONS} in order"
    where = text.split("## Where reflora computes it", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\]\[reflora\.[\w.]+\]", where), f"{path.name}: no mkdocstrings link [..][reflora.x] to the code"
    check = text.split("## Numeric check", 1)[1]
    checks = python_blocks_with_output(_tmp_page(check))
    assert checks and all(e is not None for _, e in checks), f"{path.name}: the numeric check must print a checked result"


def _tmp_page(text: str) -> Path:
    import tempfile

    f = Path(tempfile.mkdtemp()) / "section.md"
    f.write_text(text, encoding="utf-8")
    return f


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    cmds = [line.strip() for line in text.splitlines() if "python -m pytest" in line and "pip install" in line]
    assert len(cmds) == 1, f"README.md: expected one 'pip install ... && python -m pytest' line, found {cmds}"
    return cmds[0]


def test_ci_runs_the_readme_test_command_verbatim():
    cmd = _readme_test_command()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert cmd in ci, f".ci/run does not contain the README's test command {cmd!r} on a line of its own"
    assert "docs" in cmd, f"the test command {cmd!r} must install the docs extra (the docs build is a test)"


def test_getting_started_shows_the_readme_commands_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    for cmd in ("pip install -e . && reflora demo", _readme_test_command()):
        assert cmd in readme, f"README.md lacks {cmd!r}"
        assert f"```bash\n{cmd}\n```" in page, f"docs/getting-started.md lacks the README's command {cmd!r}"


def test_docs_extra_lists_what_mkdocs_yml_uses():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    extra = cfg["options.extras_require"]["docs"].lower()
    # jax: docs/kit.md checks a JAX implementation, and every block of the docs runs in CI
    for pkg in ("mkdocs", "mkdocs-material", "mkdocstrings", "pymdown-extensions", "jax"):
        assert re.search(rf"(^|\n){re.escape(pkg)}\b", extra), f"setup.cfg docs extra lacks {pkg}: {extra!r}"


def test_mkdocs_build_strict(tmp_path):
    """The site builds with warnings as errors, offline (no plugin fetches at build time)."""
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "index.html").is_file()
    # mkdocs.yml's validation settings make a page missing from the nav, a broken link or
    # anchor a warning, and --strict makes every warning an error.
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="reflora.lora_forward"' in api or 'id="reflora.ops.lora.lora_forward"' in api
    shutil.rmtree(site)
