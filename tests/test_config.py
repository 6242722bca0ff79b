"""Config plumbing: stable hashes, keyed folders, atomic JSON, and one-line errors for bad input."""
import json
import os
from pathlib import Path

import pytest

from stego_core import config
from stego_core.config import StegoError


def test_config_hash_ignores_key_order_and_sees_values():
    a = config.config_hash({"dataset": "mosaic", "res": 224})
    assert a == config.config_hash({"res": 224, "dataset": "mosaic"})
    assert a != config.config_hash({"dataset": "mosaic", "res": 320})
    assert len(a) == 10 and all(c in "0123456789abcdef" for c in a)


def test_artifact_dir_is_keyed_under_the_root(tmp_path):
    d = config.artifact_dir("features", "mosaic-train", {"res": 224}, root=tmp_path)
    assert d.parent == tmp_path / "features"
    assert d.name == f"mosaic-train-{config.config_hash({'res': 224})}"


def test_artifacts_root_prefers_argument_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STEGO_ARTIFACTS", str(tmp_path / "env"))
    assert config.artifacts_root() == tmp_path / "env"
    assert config.artifacts_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("STEGO_ARTIFACTS")
    assert config.artifacts_root().name == "artifacts"


def test_write_json_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    config.write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert os.listdir(target.parent) == ["meta.json"]


def test_write_json_atomic_keeps_old_file_when_serialisation_fails(tmp_path):
    target = tmp_path / "meta.json"
    config.write_json_atomic(target, {"ok": True})
    with pytest.raises(TypeError):
        config.write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_atomic_write_replaces_or_keeps_the_file(tmp_path):
    target = tmp_path / "a" / "weights.bin"
    with config.atomic_write(target) as fh:
        fh.write(b"first")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="interrupted"), config.atomic_write(target) as fh:
        fh.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"first" and os.listdir(target.parent) == ["weights.bin"]
    with config.atomic_write(target, "w", newline="") as fh:
        fh.write("a,b\r\n")
    assert target.read_bytes() == b"a,b\r\n"
    with pytest.raises(config.StegoError, match="mode"), config.atomic_write(target, "a"):
        pass


def test_atomic_write_fs_on_an_fsspec_filesystem(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    for fs, folder in ((fsspec.filesystem("memory"), "/atomic-test"), (fsspec.filesystem("file"), str(tmp_path))):
        path = f"{folder}/chunk.npy"
        with config.atomic_write_fs(fs, path) as fh:
            fh.write(b"ok")
        with pytest.raises(RuntimeError), config.atomic_write_fs(fs, path) as fh:
            fh.write(b"broken")
            raise RuntimeError("killed")
        assert fs.cat_file(path) == b"ok"
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)] == ["chunk.npy"]


def test_ensure_writable_names_the_parameter(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits (here and in CI): use a file system nobody writes
        locked = Path("/proc/stego-not-writable")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
    with pytest.raises(StegoError, match="^cache_root: cannot write"):
        config.ensure_writable(locked / "x", "cache_root")


def test_ensure_writable_rejects_a_file_in_the_way(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StegoError, match="^root: cannot write"):
        config.ensure_writable(blocker / "sub", "root")


def test_checks_give_one_line_naming_the_parameter():
    with pytest.raises(StegoError, match="^protocol: unknown value 'x'; expected one of 'original', 'corrected'$"):
        config.check_choice("protocol", "x", config.PROTOCOLS)
    with pytest.raises(StegoError, match="^code_dim: expected an integer >= 1, got 0$"):
        config.check_int("code_dim", 0, minimum=1)
    with pytest.raises(StegoError, match="^steps: expected an integer, got str"):
        config.check_int("steps", "10")
    with pytest.raises(StegoError, match="^steps: expected an integer, got bool"):
        config.check_int("steps", True)
    with pytest.raises(StegoError, match="^lr: expected a number"):
        config.check_float("lr", "fast")
    assert config.check_float("lr", 1) == 1.0
