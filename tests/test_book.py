"""The strict book build (-W -n) on the smoke chapters, and that it serves its JavaScript itself (offline)."""
from __future__ import annotations

import re
import shutil

import pytest

from stego_core import study
from stego_core.config import StegoError

pytestmark = pytest.mark.slow


def test_strict_build_has_every_page(smoke_html):
    pages = {p.relative_to(smoke_html).as_posix() for p in smoke_html.rglob("*.html")
             if p.relative_to(smoke_html).parts[0] not in ("_static", "vendor")}
    for page in ("index.html", "book/intro.html", "book/guide.html", "book/chapters/00_data.html",
                 "book/chapters/01_features.html", "book/reproduce.html", "book/references.html"):
        assert page in pages
    refs = (smoke_html / "book" / "references.html").read_text().lower()
    for title in ("uncovering the inner workings", "emerging properties", "distilling feature correspondences",
                  "coco-stuff", "cityscapes", "potsdam", "hierarchical nearest neighbor graph embedding"):
        assert title in refs, title
    intro = (smoke_html / "book" / "intro.html").read_text()
    assert 'href="references.html#id' in intro  # the citations resolve to the bibliography


def test_glued_numbers_are_in_the_prose(smoke_html):
    text = re.sub(r"<[^>]+>", "", (smoke_html / "book" / "chapters" / "00_data.html").read_text())
    assert re.search(r"holds\s+8\s+images", text)
    assert re.search(r"covers\s+\d+\.\d\s+%", text)


def test_javascript_is_served_from_the_book(smoke_html):
    vendor = smoke_html / "vendor"
    for rel in ("vega/vega.min.js", "vega-lite/vega-lite.min.js", "vega-embed/vega-embed.min.js",
                "requirejs/require.js", "html-manager/embed-amd.js", "mathjax/tex-mml-chtml.js"):
        assert (vendor / rel).stat().st_size > 10_000, rel
    assert not list((smoke_html / "_static").rglob("vega*.js")), "vendored JS must stay out of _static"
    for page in smoke_html.rglob("*.html"):
        if page.relative_to(smoke_html).parts[0] in ("_static", "vendor"):
            continue
        srcs = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', page.read_text())
        remote = [s for s in srcs if s.startswith(("http:", "https:", "//"))]
        assert not remote, f"{page.name} loads {remote}"
    intro = (smoke_html / "book" / "intro.html").read_text()  # the page has math: MathJax comes from the book
    assert '<script defer="defer" src="../_static/../vendor/mathjax/tex-mml-chtml.js' in intro
    widget_page = (smoke_html / "book" / "chapters" / "01_features.html").read_text()
    assert "../../_static/../vendor/requirejs/require.js" in widget_page
    assert "../../_static/../vendor/html-manager/embed-amd.js" in widget_page


def test_a_broken_reference_fails_the_strict_build(smoke_html, tmp_path):
    work = tmp_path / "broken"
    shutil.copytree(smoke_html.parents[1], work, ignore=shutil.ignore_patterns("_build"))
    intro = work / "book" / "intro.md"
    intro.write_text(intro.read_text() + "\nSee {doc}`no-such-page`.\n")
    with pytest.raises(StegoError, match="jupyter-book build failed with .*no-such-page"):
        study.build_book(work, log=lambda msg: None)
