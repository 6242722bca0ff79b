"""No typed comparison: a sentence of the book's prose that compares numbers takes them from execution (glue).

Every Markdown page under book/ and every Markdown cell of the notebooks is split into sentences. A sentence with
a comparative word (``COMPARATIVES``) must not contain a typed number: its numbers come from glue roles (computed,
and for the papers' values taken from ``stego_core.papers`` with their sources), so the words and the numbers
cannot disagree. Numbers inside math, inline code, glue, citations and cross-references do not count, nor do a
few forms that are not quantities compared (``NOT_QUANTITIES``: dimension names like "D = 3", ordinal chapter
numbers, "Table 2", "Figure 4", years).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPARATIVES = re.compile(
    r"\b(beats?|better|worse|outperforms?|wins?|ahead of|higher than|lower than|more than|less than|a little|"
    r"at every dimension|exceeds?|above (?:both|PCA|RP|the)|below (?:both|PCA|RP|the raw))\b", re.IGNORECASE)
# spans whose digits are not typed comparisons: glue / doc / cite roles, inline code, math, links
ROLES = re.compile(r"\{[a-z:]+\}`[^`]*`|``[^`]*``|`[^`]*`|\$\$.*?\$\$|\$[^$]*\$|\]\([^)]*\)", re.DOTALL)
NOT_QUANTITIES = re.compile(
    r"\b(?:Table|Figure|Fig\.|chapter|issue|step|Section|§)\s*\d+|\b(?:19|20)\d\d\b|\bD\s*=\s*\d+|\b\d+\s*(?:px|GB|GiB|"
    r"MB|cores?|minutes?|min|s|h|images?|scenes?|steps?|seeds?|classes|neighbours)\b|\bViT-[A-Z]/\d+|\bK\s*=\s*\d+|"
    r"\b\d+\s*[×x]\s*\d+|\bDINOv\d|\b[A-Za-z]+-?\d+[A-Za-z]*\b", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])[+−-]?\d+(?:[.,]\d+)?\s*%?")


def _pages() -> list[tuple[str, str]]:
    out = [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in sorted((ROOT / "book").rglob("*.md"))]
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        cells, cur, in_md = [], [], False
        for line in nb.read_text().splitlines():
            if line.startswith("# %%"):
                if in_md and cur:
                    cells.append("\n".join(cur))
                cur, in_md = [], "[markdown]" in line
            elif in_md and line.startswith("#"):
                cur.append(line[2:] if line.startswith("# ") else line[1:])
        if in_md and cur:
            cells.append("\n".join(cur))
        out.append((nb.relative_to(ROOT).as_posix(), "\n\n".join(cells)))
    return out


def _sentences(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.DOTALL)  # directives (figures, glue blocks, code)
    # blocks: paragraphs, headings, list items and definition lines each stand alone
    blocks = re.split(r"\n\s*\n|\n(?=\s*(?:#|[-*] |\d+\. |: |\|))", text)
    out = []
    for block in blocks:
        block = re.sub(r"\s+", " ", block).strip()
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z*({])", block) if s.strip()]
    return out


def typed_comparisons(text: str) -> list[str]:
    """The sentences of ``text`` that compare (a word of COMPARATIVES) next to a typed number."""
    bad = []
    for sentence in _sentences(text):
        if not COMPARATIVES.search(sentence):
            continue
        bare = NOT_QUANTITIES.sub(" ", ROLES.sub(" ", sentence))
        if NUMBER.search(bare):
            bad.append(sentence)
    return bad


def test_the_rule_catches_typed_comparisons_and_passes_glued_ones():
    assert typed_comparisons("STEGO beats PCA by 7.3 points at D = 12.")
    assert typed_comparisons("The CRF adds a little (+19.7).")
    assert typed_comparisons("The paper found STEGO ahead of both at every dimension, 9 of 9.")
    assert not typed_comparisons("STEGO {glue:md}`verdict` PCA by {glue:text}`gap:.1f` points at D = 12.")
    assert not typed_comparisons("Figure 4 shows more than one panel; see chapter 3.")
    assert not typed_comparisons("A table with 60 images and 20 CRF images.")


@pytest.mark.parametrize("name,text", _pages(), ids=[n for n, _ in _pages()])
def test_no_typed_comparison_in_the_prose(name, text):
    assert typed_comparisons(text) == [], f"{name}: compare glued numbers (or quote stego_core.papers), not typed ones"


@pytest.mark.parametrize("page", ["book/intro.md", "book/findings.md", "book/results/table2.md",
                                  "book/results/figure4.md"])
def test_pages_do_not_call_every_build_the_demo(page):
    """A book built from a paper profile must not say it is the demo: these pages name the build's dataset from
    glue (or describe the profiles), never "this book was built from the demo profile"."""
    text = re.sub(r"\s+", " ", (ROOT / page).read_text())
    claim = re.compile(r"\b(?:this|the) (?:book|page|build)(?: you are reading)? (?:was|is) built (?:from|on) the "
                       r"(?:offline )?\**demo", re.IGNORECASE)
    assert not claim.search(text), f"{page}: says this build is the demo whatever profile built it"
    assert "this book was built from the offline **demo profile**" not in text
