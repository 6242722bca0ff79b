"""The reader's view of an executed chapter: cell tags (myst-nb's) and one added cell, set by the runner after
papermill, so the page reads like a chapter while the notebook still runs as it is.

- the ``parameters`` cell and papermill's ``injected-parameters`` cell are tagged ``remove-cell`` (off the page, in
  the notebook); the parameters the chapter ran with appear instead as a collapsed table right below the title and
  its first paragraph, the summary (the title cell is split there; ``parameters_markdown``);
- the title cell (the first Markdown cell with a ``# `` heading) comes before any code cell left on the page;
- code cells that only compute and glue (no visible output) are tagged ``remove-cell`` (myst-nb still reads their
  glued values); other code is collapsed behind "show code" (``hide-input``) unless the notebook tags the cell
  ``show-input`` (code that teaches: the loss, a projection, a probe) or already chose a myst-nb tag itself.
"""
from __future__ import annotations

from typing import Any

import nbformat

from .parameters import Parameter

__all__ = ["PARAMETERS_TITLE", "parameters_markdown", "reader_view", "is_glue_only"]

#: The title of the collapsed parameter table (the browser tests look for it).
PARAMETERS_TITLE = "Parameters of this run"
_OWN_TAGS = {"remove-cell", "remove_cell", "remove-input", "remove_input", "hide-input", "hide-cell",
             "hide-output", "remove-output", "remove_output", "show-input"}
_PAPERMILL_TAGS = {"parameters", "injected-parameters"}


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _add_tag(cell: Any, tag: str) -> None:
    tags = _tags(cell)
    if tag not in tags:
        cell.setdefault("metadata", {})["tags"] = [*tags, tag]


def is_glue_only(cell: Any) -> bool:
    """A code cell whose outputs show nothing: glue records made with ``display=False`` (their mime types carry a
    prefix), empty streams, or no outputs at all, and whose source glues something."""
    if cell.get("cell_type") != "code" or "glue(" not in "".join(cell.get("source", "")):
        return False
    for out in cell.get("outputs", []):
        scrap = out.get("metadata", {}).get("scrapbook")
        if scrap is not None and scrap.get("mime_prefix"):
            continue
        if out.get("output_type") == "stream" and not "".join(out.get("text", "")).strip():
            continue
        return False
    return True


def _cell_text(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def parameters_markdown(params: list[Parameter], values: dict[str, Any]) -> str:
    """A collapsed MyST admonition with one row per parameter: name, the value it ran with (bold where it differs
    from the notebook's default) and the parameter's comment."""
    rows = ["| parameter | value | meaning |", "| --- | --- | --- |"]
    for p in params:
        value = values.get(p.name, p.default)
        shown = _cell_text(value)
        if p.name in values and values[p.name] != p.default:
            shown = f"**{shown}** (default {_cell_text(p.default)})"
        rows.append(f"| `{p.name}` | {shown} | {p.comment.replace('|', chr(92) + '|')} |")
    n_set = sum(1 for p in params if p.name in values and values[p.name] != p.default)
    title = f"{PARAMETERS_TITLE} ({len(params)}, {n_set} set for this run)"
    return "\n".join([f":::{{admonition}} {title}", ":class: dropdown stego-parameters", "", *rows, ":::"])


def _is_title(cell: Any) -> bool:
    return cell.get("cell_type") == "markdown" and any(
        line.startswith("# ") for line in "".join(cell.get("source", "")).splitlines())


def _split_after_summary(cells: list, at: int) -> None:
    """Split the title cell after its first paragraph (the summary), so the parameter table sits right below it."""
    text = "".join(cells[at].get("source", ""))
    blocks = text.split("\n\n")
    heading = next((i for i, b in enumerate(blocks) if b.lstrip().startswith("# ")), None)
    if heading is None or len(blocks) <= heading + 2:
        return
    summary = blocks[heading + 1].lstrip()
    if not summary or summary.startswith((":::", "```", "$$", "|", "-", "*", "1.", "{")):
        return  # not a plain paragraph: leave the cell whole
    cells[at]["source"] = "\n\n".join(blocks[:heading + 2])
    cells.insert(at + 1, nbformat.v4.new_markdown_cell("\n\n".join(blocks[heading + 2:])))


def reader_view(nb: Any, params: list[Parameter], values: dict[str, Any]) -> Any:
    """Tag the cells of an executed notebook (nbformat v4) for the reader and add the parameter table; returns
    ``nb`` (changed in place). Running the notebook again (Jupyter, papermill) is unaffected: only Markdown cells
    move or are added, and tags do not change execution."""
    cells = nb.cells
    for cell in cells:
        tags = set(_tags(cell))
        if cell.get("cell_type") != "code":
            continue
        if tags & _PAPERMILL_TAGS or (is_glue_only(cell) and "show-input" not in tags):
            _add_tag(cell, "remove-cell")
        elif not tags & _OWN_TAGS:
            _add_tag(cell, "hide-input")
    title_at = next((i for i, c in enumerate(cells) if _is_title(c)), None)
    if title_at is not None:
        first_code = next((i for i, c in enumerate(cells)
                           if c.get("cell_type") == "code" and "remove-cell" not in _tags(c)), len(cells))
        if first_code < title_at:
            cells.insert(0, cells.pop(title_at))
            title_at = 0
    if title_at is not None:
        _split_after_summary(cells, title_at)
    at = 0 if title_at is None else title_at + 1
    table = nbformat.v4.new_markdown_cell(parameters_markdown(params, values))
    table.metadata["tags"] = ["stego-parameters"]
    cells.insert(at, table)
    return nb
