"""Reading executed chapters in tests: the numbers a notebook glued with myst-nb."""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import nbformat

_PLAIN = "application/papermill.record/text/plain"
_MARKDOWN = "application/papermill.record/text/markdown"


def glued(nb, prefer: str = "plain") -> dict[str, str]:
    """name -> value of every ``glue()`` call in ``nb`` (myst-nb stores them as papermill records).

    ``prefer`` picks the representation read first ("plain" or "markdown"); the other one is the fallback.
    """
    first, second = (_PLAIN, _MARKDOWN) if prefer == "plain" else (_MARKDOWN, _PLAIN)
    out = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                out[name] = output["data"].get(first) or output["data"].get(second)
    return out


# ------------------------------------------------------------------------------------ numbers pasted into pages
_TEXT_ROLE = re.compile(r"\{glue:text\}`([^`]+?\.ipynb)::([^`:]+)(?::([^`]*))?`")


def _plain_value(output) -> str:
    data = output.get("data", {})
    for key in (_PLAIN, "text/plain"):
        if key in data:
            text = data[key]
            return "".join(text) if isinstance(text, list) else text
    raise KeyError("no text/plain")


def _formatted(plain: str, spec: str | None) -> str:
    """The text a reader sees for ``{glue:text}`nb::key:spec``` (written here from the format-spec rules of Python,
    not taken from myst-nb): the value is the Python literal in text/plain; the spec's type letter picks int / float
    / str."""
    try:
        value = ast.literal_eval(plain)
    except (SyntaxError, ValueError):
        value = plain
    if not spec:
        return str(value)
    kind = spec[-1]
    value = (int(value) if kind in "bcdoxX" else float(value) if kind in "eEfFgGn%" else str(value))
    return format(value, spec)


def pasted_numbers(page_md: Path) -> list[tuple[str, str]]:
    """(notebook::key, text) for every ``{glue:text}`` role of a Markdown page, read from the executed notebooks
    the page names (paths relative to the page)."""
    out, books = [], {}
    for rel, key, spec in _TEXT_ROLE.findall(page_md.read_text()):
        path = (page_md.parent / rel).resolve()
        if path not in books:
            nb = nbformat.read(path, as_version=4)
            books[path] = {o["metadata"]["scrapbook"]["name"]: o for c in nb.cells for o in c.get("outputs", [])
                           if "scrapbook" in o.get("metadata", {})}
        out.append((f"{Path(rel).name}::{key}", _formatted(_plain_value(books[path][key]), spec)))
    return out


def missing_pasted_numbers(page_text: str, page_md: Path) -> list[str]:
    """The pasted values that the page text does not show as often as the page pastes them (empty: all there)."""
    want = Counter(text for _, text in pasted_numbers(page_md))
    names = {text: name for name, text in pasted_numbers(page_md)}
    text = " ".join(page_text.split())

    def shown(value: str) -> int:  # whole numbers only: 31.2 is not inside 31.25 or 131.2
        return len(re.findall(r"(?<![\w.])" + re.escape(value) + r"(?![\w]|\.\d)", text))

    return [f"{names[value]} = {value!r} (pasted {n}x, on the page {shown(value)}x)"
            for value, n in want.items() if shown(value) < n]
