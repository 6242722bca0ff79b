"""The reader's view of a chapter (stego_core.book.reader), the book's table and figure HTML (stego_core.book.viz)
and the CSS the Sphinx extension adds: checked on small hand-made notebooks, frames and chart specs."""
from __future__ import annotations

import html as html_lib
import json

import altair as alt
import nbformat
import numpy as np
import pandas as pd
import pytest

from stego_core.book import reader, sphinx_ext, viz
from stego_core.book.parameters import Parameter

PARAMS = [Parameter("code_dim", None, "D, channels of the code; None takes the preset"),
          Parameter("steps", 800, "optimiser steps | a pipe"),
          Parameter("dataset", "mosaic", "the dataset")]


def _glue_output(name: str, *, shown: bool) -> dict:
    prefix = "" if shown else "application/papermill.record/"
    return nbformat.v4.new_output("display_data", data={prefix + "text/plain": "'1.5'"},
                                  metadata={"scrapbook": {"name": name, "mime_prefix": prefix}})


def _chapter() -> nbformat.NotebookNode:
    v4 = nbformat.v4
    params = v4.new_code_cell("code_dim = None\nsteps = 800", metadata={"tags": ["parameters"]})
    injected = v4.new_code_cell("steps = 6", metadata={"tags": ["injected-parameters"]})
    title = v4.new_markdown_cell("# Training STEGO\n\nOne paragraph that says what the chapter shows.")
    imports = v4.new_code_cell("from stego_core import training")
    glue_only = v4.new_code_cell("glue('gain', '1.5', display=False)")
    glue_only.outputs = [_glue_output("gain", shown=False)]
    glue_shown = v4.new_code_cell("glue('chart', chart)")
    glue_shown.outputs = [_glue_output("chart", shown=True)]
    teach = v4.new_code_cell("loss = corr_loss(f, g, b)\nglue('loss', loss, display=False)",
                             metadata={"tags": ["show-input"]})  # teaching code that also glues: it stays
    teach.outputs = [_glue_output("loss", shown=False)]
    shown = v4.new_code_cell("table")
    shown.outputs = [v4.new_output("execute_result", data={"text/plain": "x"}, execution_count=1)]
    return v4.new_notebook(cells=[params, injected, title, imports, glue_only, glue_shown, teach, shown])


def _tags(cell) -> list[str]:
    return list(cell.metadata.get("tags", []))


def test_reader_view_tags_cells_and_adds_the_parameter_table():
    nb = reader.reader_view(_chapter(), PARAMS, {"steps": 6})
    sources = [c.source for c in nb.cells]
    # the raw parameter cells are off the page but still in the notebook (papermill needs them)
    assert "remove-cell" in _tags(nb.cells[0]) and "parameters" in _tags(nb.cells[0])
    assert "remove-cell" in _tags(nb.cells[1]) and "injected-parameters" in _tags(nb.cells[1])
    # the first cell a reader sees is the title; the collapsed parameter table follows it
    visible = [c for c in nb.cells if "remove-cell" not in _tags(c)]
    assert visible[0].source.startswith("# Training STEGO")
    table = visible[1]
    assert table.cell_type == "markdown" and reader.PARAMETERS_TITLE in table.source
    assert ":class: dropdown" in table.source
    assert "| `steps` | **`6`** (default `800`) |" in table.source  # set for this run: bold, with the default
    assert "| `code_dim` | `None` |" in table.source  # not set: the default, plain
    assert "optimiser steps \\| a pipe" in table.source  # a pipe in a comment does not split the row
    assert "(3, 1 set for this run)" in table.source
    by_source = dict(zip(sources, nb.cells))
    assert "remove-cell" in _tags(by_source["glue('gain', '1.5', display=False)"])  # computes and glues only
    assert "hide-input" in _tags(by_source["glue('chart', chart)"])  # glues and shows: the output stays
    assert _tags(by_source["loss = corr_loss(f, g, b)\nglue('loss', loss, display=False)"]) == ["show-input"]
    assert "hide-input" in _tags(by_source["from stego_core import training"])
    assert "hide-input" in _tags(by_source["table"])
    assert len(nb.cells) == len(_chapter().cells) + 1  # only the table was added; nothing dropped
    nbformat.validate(nb)


def test_reader_view_puts_the_title_before_code():
    v4 = nbformat.v4
    nb = v4.new_notebook(cells=[v4.new_code_cell("x = 1"), v4.new_markdown_cell("intro text"),
                                v4.new_markdown_cell("# The title\n\nSummary.")])
    out = reader.reader_view(nb, [], {})
    assert out.cells[0].source.startswith("# The title")
    assert reader.PARAMETERS_TITLE in out.cells[1].source
    assert [c.source for c in out.cells[2:]] == ["x = 1", "intro text"]


def test_glue_only_needs_a_glue_call_and_no_visible_output():
    v4 = nbformat.v4
    plain = v4.new_code_cell("x = 1")
    assert not reader.is_glue_only(plain)  # nothing glued: collapsed, not removed
    printed = v4.new_code_cell("glue('a', 1, display=False)\nprint('hi')")
    printed.outputs = [_glue_output("a", shown=False), v4.new_output("stream", name="stdout", text="hi\n")]
    assert not reader.is_glue_only(printed)
    quiet = v4.new_code_cell("glue('a', 1, display=False)")
    quiet.outputs = [_glue_output("a", shown=False), v4.new_output("stream", name="stdout", text="\n")]
    assert reader.is_glue_only(quiet)


def test_frame_html_hides_the_default_index_and_rounds():
    df = pd.DataFrame({"method": ["STEGO", "PCA"], "code_dim": [24.0, 6.0], "cluster_miou": [31.23456, 28.1],
                       "tiny": [0.001234, np.nan]})
    out = viz.frame_html(df)
    assert out.startswith('<div class="stego-table">')
    assert "<th>0</th>" not in out and "<th>1</th>" not in out  # no 0, 1, … index
    heads = [h.split("</th>")[0] for h in out.split("<th>")[1:]]
    assert heads == ["method", "D", "cluster miou", "tiny"]
    cells = [c.split("</td>")[0] for c in out.split("<td>")[1:]]
    assert cells == ["STEGO", "24", "31.23", "0.0012", "PCA", "6", "28.1", "–"]
    named = viz.frame_html(df.set_index("method"))
    assert "<th>STEGO</th>" in named  # a meaningful index stays
    escaped = viz.frame_html(pd.DataFrame({"a": ["<b>"]}))
    assert "&lt;b&gt;" in escaped


def test_charts_come_with_alt_text_and_a_caption():
    df = pd.DataFrame({"D": [3, 6], "mIoU": [20.0, 25.0]})
    chart = alt.layer(alt.Chart(df).mark_line().encode(x=alt.X("D:Q", title="code dimension D"), y="mIoU:Q"),
                      alt.Chart(df).mark_rule().encode(y="mIoU:Q")).properties(title="Figure 4")
    spec = chart.to_dict()
    text = viz.chart_alt(spec)
    assert text.startswith("Chart “Figure 4”") and "line, rule marks" in text
    assert "x: code dimension D" in text and "y: mIoU" in text
    assert viz.chart_caption(spec) == "Figure 4"
    described = dict(spec, description="STEGO against PCA per dimension")
    assert viz.chart_alt(described) == viz.chart_caption(described) == "STEGO against PCA per dimension"
    out = viz.chart_html(spec)
    assert f'aria-label="{html_lib.escape(text)}"' in out and "<figcaption>Figure 4</figcaption>" in out
    assert out.rstrip().endswith("</script>")
    assert json.loads(out.split("var spec = ", 1)[1].split(";\n", 1)[0])["title"] == "Figure 4"


def test_the_extension_serves_the_reader_css():
    css = (sphinx_ext.STATIC / "stego.css").read_text()
    assert "pre-wrap" in css and "overflow-x: auto" in css

    class App:
        def __init__(self):
            self.css, self.events = [], {}
            self.config = type("Config", (), {"html_static_path": []})()

        def connect(self, event, fn, priority=500):
            self.events.setdefault(event, []).append(fn)

        def add_css_file(self, name):
            self.css.append(name)

    app = App()
    sphinx_ext.setup(app)
    assert app.css == ["stego.css"]
    for fn in app.events["builder-inited"]:
        fn(app)
    assert app.config.html_static_path == [str(sphinx_ext.STATIC)]


@pytest.mark.parametrize("value, text", [(3.0, "3"), (0.5, "0.5"), (12.345, "12.35"), (-0.004, "-0.004"),
                                         (float("nan"), "–")])
def test_numbers_are_rounded_for_reading(value, text):
    assert viz._number(value) == text


def test_pasted_numbers_are_checked_against_the_chapter(tmp_path):
    from chapters import missing_pasted_numbers, pasted_numbers

    v4 = nbformat.v4
    cell = v4.new_code_cell("glue(...)")
    cell.outputs = [_glue_output("gain", shown=False), _glue_output("n", shown=False)]
    cell.outputs[0]["data"] = {"application/papermill.record/text/plain": "31.2456"}
    cell.outputs[1]["data"] = {"application/papermill.record/text/plain": "8"}
    cell.outputs[1]["metadata"]["scrapbook"]["name"] = "n"
    (tmp_path / "chapters").mkdir()
    nbformat.write(v4.new_notebook(cells=[cell]), tmp_path / "chapters" / "04.ipynb")
    page = tmp_path / "results" / "table2.md"
    page.parent.mkdir()
    page.write_text("STEGO {glue:text}`../chapters/04.ipynb::gain:.1f` on {glue:text}`../chapters/04.ipynb::n:d`"
                    " images; again {glue:text}`../chapters/04.ipynb::gain:+.2f`.\n")
    assert pasted_numbers(page) == [("04.ipynb::gain", "31.2"), ("04.ipynb::n", "8"), ("04.ipynb::gain", "+31.25")]
    assert missing_pasted_numbers("STEGO 31.2 on 8\n images; again +31.25.", page) == []
    wrong = missing_pasted_numbers("STEGO 30.9 on 8 images; again +31.25.", page)  # the page shows another number
    assert wrong == ["04.ipynb::gain = '31.2' (pasted 1x, on the page 0x)"]


def test_pictures_have_alt_text():
    pic = np.zeros((4, 4, 3), dtype=np.uint8)
    out = viz.show_images([pic, pic], ["ground truth", ""])._repr_html_()
    assert 'alt="ground truth"' in out and 'alt="picture 2 of 2"' in out


def test_the_parameter_table_follows_the_summary_paragraph():
    v4 = nbformat.v4
    md = "# Title\n\nThe summary in one paragraph,\nover two lines.\n\nMore detail.\n\n$$x$$"
    nb = v4.new_notebook(cells=[v4.new_code_cell("a = 1", metadata={"tags": ["parameters"]}),
                                v4.new_markdown_cell(md), v4.new_code_cell("a")])
    out = reader.reader_view(nb, [Parameter("a", 1, "")], {})
    assert [c.source for c in out.cells[1:2]] == ["# Title\n\nThe summary in one paragraph,\nover two lines."]
    assert reader.PARAMETERS_TITLE in out.cells[2].source
    assert out.cells[3].source == "More detail.\n\n$$x$$"
    assert "".join(c.source for c in out.cells if c.cell_type == "markdown").count("More detail.") == 1
    # a title cell that holds only the title and its summary, or whose next block is not a paragraph, stays whole
    for whole in ("# Title\n\nSummary.", "# Title\n\n:::{note}\nx\n:::\n\ntext"):
        nb = v4.new_notebook(cells=[v4.new_markdown_cell(whole)])
        assert reader.reader_view(nb, [], {}).cells[0].source == whole
