"""The study runner: parameters cells, -p parsing and checking, profiles, keyed re-execution, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from stego_core import study
from stego_core.book import build, runner, sphinx_ext
from stego_core.config import StegoError

NOTEBOOKS = sorted(p.stem for p in (study.repo_root() / "notebooks").glob("[0-9]*.py"))


def test_read_parameters_of_the_data_notebook():
    params = {p.name: p for p in study.read_parameters("00_data")}
    assert list(params)[0] == "dataset"
    assert params["dataset"].default == "mosaic"
    assert params["n_examples"].default == 8 and isinstance(params["n_examples"].default, int)
    assert params["dataset_options"].default == {}
    assert "mosaic" in params["dataset"].comment


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_parameter_has_a_comment_that_papermill_reads(name):
    """House style: literals only, a comment on every line, and papermill's own parser agrees (no '=' in comments)."""
    import papermill

    ours = study.read_parameters(name)
    assert ours, f"{name} has no parameters"
    for p in ours:
        assert p.comment, f"{name}: parameter {p.name} has no comment"
    nb = runner._to_notebook(study.notebook_path(name))
    theirs = papermill.inspect_notebook(_write(nb))
    assert list(theirs) == [p.name for p in ours]
    for p in ours:
        assert theirs[p.name]["help"] == p.comment


def _write(nb) -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "nb.ipynb"
    nbformat.write(nb, path)
    return str(path)


def test_parameters_cell_must_hold_literals(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('# %% tags=["parameters"]\nx = 1  # fine\ny = len("ab")  # not a literal\n\n# %%\nprint(x)\n')
    with pytest.raises(StegoError, match=r"bad.py: parameters cell line 3: .*not a literal"):
        study.read_parameters(bad)
    none = tmp_path / "none.py"
    none.write_text("# %%\nx = 1\n")
    with pytest.raises(StegoError, match="no cell tagged parameters"):
        study.read_parameters(none)


def test_unknown_parameter_name_is_refused_with_the_valid_names():
    with pytest.raises(StegoError) as err:
        study.check_parameters("00_data", {"n_exampels": 3})
    msg = str(err.value)
    assert "n_exampels" in msg and "valid names" in msg
    for p in study.read_parameters("00_data"):
        assert p.name in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name,value,expected", [
    ("n_examples", "eight", "expected an integer"),
    ("n_examples", 2.5, "expected an integer"),
    ("n_examples", True, "expected an integer"),
    ("alpha", "high", "expected a number"),
    ("progress", 1, "expected a boolean"),
    ("dataset_options", [1, 2], "expected a mapping"),
    ("dataset", 3, "expected a string"),
])
def test_wrong_type_is_refused(name, value, expected):
    with pytest.raises(StegoError, match=expected) as err:
        study.check_parameters("00_data", {name: value})
    assert name in str(err.value)


def test_values_are_coerced_to_the_defaults_types():
    out = study.check_parameters("00_data", {"alpha": 1, "n_examples": 3, "dataset_options": {"n_images": 4}})
    assert out == {"alpha": 1.0, "n_examples": 3, "dataset_options": {"n_images": 4}}
    assert isinstance(out["alpha"], float)
    # a None default (weights) takes any value
    assert study.check_parameters("01_features", {"weights": "random"}) == {"weights": "random"}


@pytest.mark.parametrize("text,value", [
    ("3", 3), ("0.5", 0.5), ("1e-3", 1e-3), ("True", True), ("false", False), ("None", None),
    ("[1, 2]", [1, 2]), ("{n_images: 4}", {"n_images": 4}), ("mosaic", "mosaic"), ("a: b: c", "a: b: c"),
])
def test_parse_value_reads_yaml_literals(text, value):
    assert study.parse_value(text) == value
    assert type(study.parse_value(text)) is type(value)


def test_cli_text_stays_text_for_string_parameters():
    values = study.parse_cli_parameters("00_data", [("dataset", "007"), ("n_examples", "4"), ("split", "true")])
    assert values == {"dataset": "007", "n_examples": 4, "split": "true"}


def test_cli_reports_bad_parameters_in_one_line(capsys):
    assert study.main(["run", "00_data", "-p", "nope", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: -p nope:") and "valid names: dataset, split" in err
    assert len(err.splitlines()) == 1
    assert study.main(["run", "00_data", "-p", "n_examples", "many"]) == 2
    assert "n_examples: expected an integer" in capsys.readouterr().err
    assert study.main(["run", "no_such_notebook"]) == 2
    assert "00_data" in capsys.readouterr().err


def test_cli_params_lists_names_defaults_and_comments(capsys):
    assert study.main(["params", "01_features"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(study.read_parameters("01_features"))
    assert lines[0].startswith("dataset = 'mosaic'  # ")
    assert any(line.startswith("k = 30  # ") for line in lines)


def test_profiles_validate_their_parameters(tmp_path):
    runs = dict(study.load_profile("smoke"))
    assert list(runs)[:2] == ["00_data", "01_features"]
    assert runs["00_data"]["res"] == 64 and runs["00_data"]["n_examples"] == 2
    assert "backbone" not in runs["00_data"]  # shared values only reach notebooks that have the parameter
    assert dict(study.load_profile("demo"))["01_features"]["backbone"] == "efficientnet_lite0"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"notebooks": [{"notebook": "00_data", "parameters": {"n_exampels": 1}}]}))
    with pytest.raises(StegoError, match="bad.yaml 00_data: n_exampels: 00_data has no parameter"):
        study.load_profile(bad)
    bad.write_text(yaml.safe_dump({"notebooks": [{"notebook": "00_data", "parameters": {"n_examples": "x"}}]}))
    with pytest.raises(StegoError, match="n_examples: expected an integer"):
        study.load_profile(bad)
    with pytest.raises(StegoError, match="--profile: 'nope' not found; expected one of .*demo"):
        study.load_profile("nope")


def test_run_key_depends_on_source_and_parameters(tmp_path):
    nb = tmp_path / "tiny.py"
    nb.write_text(_TINY)
    k1 = study.run_key(nb, {"x": 1})
    assert k1 == study.run_key(nb, {"x": 1})
    assert k1 != study.run_key(nb, {"x": 2})
    nb.write_text(_TINY + "\n# %%\nprint('more')\n")
    assert k1 != study.run_key(nb, {"x": 1})



def test_library_hash_follows_the_package_sources(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "notes.txt").write_text("not a source")
    h = runner.library_hash(pkg)
    (pkg / "notes.txt").write_text("changed, still not a source")
    assert runner.library_hash(pkg) == h
    (pkg / "sub" / "b.py").write_text("y = 3\n")  # a fix deep in the package
    h2 = runner.library_hash(pkg)
    assert h2 != h
    (pkg / "sub" / "b.py").rename(pkg / "b2.py")  # same bytes, other module
    assert runner.library_hash(pkg) != h2
    # the default is the installed stego_core: every module of it, the book subpackage included
    assert runner.library_hash() == runner.library_hash(Path(runner.__file__).resolve().parents[1])


def test_run_key_changes_when_the_library_changes(tmp_path, monkeypatch):
    nb = tmp_path / "tiny.py"
    nb.write_text(_TINY)
    k1 = study.run_key(nb, {"x": 1})
    monkeypatch.setattr(runner, "library_hash", lambda package=None: "0123456789abcdef")
    assert study.run_key(nb, {"x": 1}) != k1

def test_prune_toc_drops_missing_files_and_empty_parts():
    toc = {"format": "jb-book", "root": "book/intro", "parts": [
        {"caption": "A", "chapters": [{"file": "book/x"}, {"file": "book/chapters/01"}]},
        {"caption": "B", "chapters": [{"file": "book/chapters/02"}]}]}
    out = build._prune_toc(toc, lambda f: f != "book/chapters/02")
    assert out["parts"] == [{"caption": "A", "chapters": [{"file": "book/x"}, {"file": "book/chapters/01"}]}]
    assert list(build._toc_entries(toc)) == ["book/x", "book/chapters/01", "book/chapters/02"]


_TINY = '''# %% tags=["parameters"]
x = 1  # a number to double; negative numbers fail on purpose

# %%
if x < 0:
    raise ValueError(f"boom {x}")
print("double", 2 * x)
'''


@pytest.mark.slow
def test_pages_that_paste_from_unexecuted_chapters_are_left_out(tmp_path):
    text = ("See {glue:text}`chapters/02_a.ipynb::x:.1f` and {glue:text}`../chapters/04_b.ipynb::n:s`.\n"
            "```{glue:any} fig\n:doc: ../chapters/06_c.ipynb\n```\n{glue:text}`local_key` {doc}`other`\n")
    assert study.pasted_from(text) == ["../chapters/04_b.ipynb", "../chapters/06_c.ipynb", "chapters/02_a.ipynb"]
    (tmp_path / "book" / "results").mkdir(parents=True)
    (tmp_path / "book" / "chapters").mkdir()
    (tmp_path / "book" / "results" / "fig.md").write_text(
        "# Fig\n```{glue:any} fig\n:doc: ../chapters/06_c.ipynb\n```\n")
    (tmp_path / "book" / "plain.md").write_text("# Plain\nNo glue here.\n")
    assert study.page_ready(tmp_path, "book/plain")
    assert not study.page_ready(tmp_path, "book/results/fig")
    assert not study.page_ready(tmp_path, "book/chapters/06_c")
    (tmp_path / "book" / "chapters" / "06_c.ipynb").write_text("{}")
    assert study.page_ready(tmp_path, "book/results/fig") and study.page_ready(tmp_path, "book/chapters/06_c")


def test_pages_are_rebuilt_when_a_chapter_they_paste_from_changes():
    from types import SimpleNamespace

    env = SimpleNamespace(found_docs={"book/findings", "book/results/table2", "book/intro"},
                          stego_glue_sources={"book/findings": {"book/chapters/02", "book/chapters/06"},
                                              "book/results/table2": {"book/chapters/04"},
                                              "book/gone": {"book/chapters/06"}})
    outdated = sphinx_ext._pages_pasting_from_changed
    assert outdated(None, env, set(), {"book/chapters/06"}, set()) == ["book/findings"]
    assert outdated(None, env, {"book/chapters/04"}, set(), set()) == ["book/results/table2"]
    assert outdated(None, env, set(), {"book/chapters/00"}, set()) == []
    sphinx_ext._purge_glue_sources(None, env, "book/findings")
    assert outdated(None, env, set(), {"book/chapters/06"}, set()) == []


def test_the_book_pages_paste_only_from_chapters_in_the_toc():
    import yaml

    root = study.repo_root()
    entries = set(build._toc_entries(yaml.safe_load((root / "_toc.yml").read_text())))
    pasting = set()
    for entry in entries:
        page = root / f"{entry}.md"
        if page.exists():
            for ref in study.pasted_from(page.read_text()):
                target = (page.parent / ref).resolve().relative_to(root).with_suffix("").as_posix()
                assert target in entries, f"{entry} pastes from {ref}, which is not in _toc.yml"
                pasting.add(entry)
    assert {"book/findings", "book/results/table2", "book/results/figure4"} <= pasting


def test_run_notebook_executes_skips_when_current_and_reports_failures(tmp_path):
    nb = tmp_path / "tiny.py"
    nb.write_text(_TINY)
    logs = []
    first = study.run_notebook(nb, {"x": 3}, workdir=tmp_path, log=logs.append)
    out = tmp_path / "book" / "chapters" / "tiny.ipynb"
    assert first.output == out and not first.skipped
    assert "double 6" in _stdout(out)
    meta = nbformat.read(out, as_version=4).metadata["stego_study"]
    assert meta["parameters"] == {"x": 3} and meta["key"] == study.run_key(nb, {"x": 3})
    stamp = out.stat().st_mtime_ns

    again = study.run_notebook(nb, {"x": 3}, workdir=tmp_path, log=logs.append)
    assert again.skipped and out.stat().st_mtime_ns == stamp
    assert "up to date" in logs[-1]

    other = study.run_notebook(nb, {"x": 4}, workdir=tmp_path, log=logs.append)
    assert not other.skipped and "double 8" in _stdout(out)

    forced = study.run_notebook(nb, {"x": 4}, workdir=tmp_path, force=True, log=logs.append)
    assert not forced.skipped and "double 8" in _stdout(out)

    with pytest.raises(StegoError, match=r"tiny: the notebook failed \(ValueError: boom -1\)") as err:
        study.run_notebook(nb, {"x": -1}, workdir=tmp_path, log=logs.append)
    failed = tmp_path / "book" / "chapters" / ".tiny.failed.ipynb"
    assert str(failed) in str(err.value) and failed.exists()
    assert "double 8" in _stdout(out)  # the last good chapter is kept


def _stdout(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")


def test_kernel_spec_points_at_this_interpreter():
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    name = study.ensure_kernel()
    spec = KernelSpecManager().get_kernel_spec(name)
    assert spec.argv[0] == sys.executable
    assert json.loads(json.dumps(spec.to_dict()))["language"] == "python"


def test_segment_subcommand_hands_over_to_the_segment_cli(tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(b"not an image")
    code = study.main(["segment", "--run", str(tmp_path / "no-such-run"), str(image), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no-such-run" in err and err.count("\n") == 1
