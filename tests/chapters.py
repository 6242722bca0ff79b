"""Reading executed chapters in tests: the numbers a notebook glued with myst-nb."""
from __future__ import annotations

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
