"""The whole study on your own folder of images and labels (the ``directory`` dataset): every notebook of a
smoke-sized profile runs (12§4.8: chapter 04 used to stop, looking runs up on the preset's dataset), and a run that
a downstream chapter misses is made by the command its message gives."""
from __future__ import annotations

import shlex

import nbformat
import pytest
import yaml
from chapters import glued
from datatrees import make_directory

from stego_core import study

pytestmark = pytest.mark.slow

CLASSES = ["sky", "road", "tree"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A folder in the directory layout (12 training, 4 validation images with labels) and a profile that is the
    smoke profile on it."""
    base = tmp_path_factory.mktemp("directory-study")
    make_directory(base / "data", n_classes=len(CLASSES), n_train=12, n_val=4, size=(72, 96))
    profile = yaml.safe_load(study.profile_path("smoke").read_text())
    profile["parameters"].update(dataset="directory",
                                 dataset_options={"n_classes": len(CLASSES), "class_names": CLASSES})
    path = base / "directory.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return base, path


def test_every_chapter_runs_on_a_directory_dataset(study_dir, monkeypatch):
    base, profile = study_dir
    monkeypatch.setenv("STEGO_DATA", str(base / "data"))
    monkeypatch.setenv("STEGO_ARTIFACTS", str(base / "artifacts"))
    workdir = study.prepare_workdir(base / "book")
    done = study.run_profile(profile, workdir=workdir, log=lambda _: None)
    assert [r.notebook for r in done] == [nb for nb, _ in study.load_profile("smoke")]
    for r in done:
        nb = nbformat.read(r.output, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
        assert not errors, (r.notebook, errors[:1])
    evaluated = glued(nbformat.read(workdir / "book" / "chapters" / "04_evaluate.ipynb", as_version=4))
    assert evaluated["eval_dataset_name"].strip("'") == "directory" and evaluated["n_val"] == "4"
    assert 0 <= float(evaluated["stego_cluster_miou"]) <= 100


def test_a_missing_run_is_made_by_the_command_the_message_gives(study_dir, monkeypatch):
    """The explorer asks for RP at a dimension the sweep did not train: it stops and names a command; that command
    (a scratch book folder, the same artifacts) trains exactly the missing run, and the explorer then runs."""
    base, profile = study_dir
    monkeypatch.setenv("STEGO_DATA", str(base / "data"))
    monkeypatch.setenv("STEGO_ARTIFACTS", str(base / "artifacts"))
    params = {**dict(study.load_profile(profile))["05_explorer"], "methods": ["rp"], "dims": [5]}
    workdir = study.prepare_workdir(base / "explorer-rp")
    with pytest.raises(study.StegoError) as info:
        study.run_notebook("05_explorer", params, workdir=workdir, log=lambda _: None)
    msg = str(info.value)
    assert "no finished run of rp d=5" in msg, msg
    command = shlex.split(msg.split(" make it with ", 1)[1].split(" (or set", 1)[0])
    assert command[:3] == ["stego-study", "run", "03_dimension_study"]
    assert study.main(command[1:]) == 0
    ran = study.run_notebook("05_explorer", params, workdir=workdir, force=True, log=lambda _: None)
    assert glued(nbformat.read(ran.output, as_version=4))["n_models"] == "1"
