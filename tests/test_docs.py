"""The documentation renders offline: the built pages load no script, style or font from the network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

# an element that makes the browser fetch something: scripts, style sheets, images, frames, CSS imports
REMOTE = re.compile(
    r"<(?:script|img|iframe|source)\b[^>]*\bsrc=[\"'](?:https?:)?//"
    r"|<link\b[^>]*\bhref=[\"'](?:https?:)?//"
    r"|@import\s+(?:url\()?[\"']?(?:https?:)?//"
    r"|url\([\"']?(?:https?:)?//",
    re.I,
)


def remote_references(site: Path) -> list[str]:
    """Every place in the built site that would load something from another host."""
    found = []
    for f in sorted(site.rglob("*")):
        if f.suffix in (".html", ".css", ".js") and f.is_file():
            for m in REMOTE.finditer(f.read_text(errors="replace")):
                found.append(f"{f.relative_to(site)}: {m.group(0)[:80]}")
    return found


def test_the_detector_sees_a_cdn_script(tmp_path):
    (tmp_path / "a.html").write_text('<script defer src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"></script>')
    (tmp_path / "b.css").write_text("@import url('https://fonts.example.org/x.css');")
    (tmp_path / "c.html").write_text('<a href="https://www.sphinx-doc.org/">Sphinx</a><script src="_static/x.js"></script>')
    assert [r.split(":")[0] for r in remote_references(tmp_path)] == ["a.html", "b.css"]


def test_built_pages_render_maths_from_a_local_copy(tmp_path):
    pytest.importorskip("sphinx", reason="the docs extra (sphinx) is not installed")
    pytest.importorskip("furo", reason="the docs extra (furo) is not installed")
    from importlib.util import find_spec

    if find_spec("sphinx-mathjax-offline") is None:
        pytest.skip("the docs extra (sphinx-mathjax-offline) is not installed")
    from sphinx.application import Sphinx

    src = tmp_path / "src"
    src.mkdir()
    (src / "index.rst").write_text("Maths\n=====\n\nInline :math:`\\phi^{-1}(p)` and\n\n.. math::\n\n   u \\circ \\phi = u(p + u(p))\n")
    out = tmp_path / "html"
    app = Sphinx(str(src), str(DOCS), str(out), str(tmp_path / "doctrees"), "html", status=None, warning=None, freshenv=True)
    app.build()
    page = (out / "index.html").read_text()
    scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", page)
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax, f"no MathJax script on a page with maths: {scripts}"
    for s in mathjax:
        assert (out / s.split("?")[0]).is_file(), f"{s} is not in the built site"
    assert remote_references(out) == []
