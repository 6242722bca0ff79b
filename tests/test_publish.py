"""Publishing (stego_core.book.publish): `make publish` against a local bare repository, the repository-URL
setting that turns on the repository and launch buttons, the Pages workflow, Binder's postBuild."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stego_core.book import publish
from stego_core.config import StegoError

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, env=env).stdout


def _clone_with_html(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A bare 'remote', a clone with one commit on main (the book's sources would be there) and a built site."""
    bare, clone, html = tmp_path / "remote.git", tmp_path / "clone", tmp_path / "html"
    _git("init", "--bare", "-q", str(bare))
    _git("init", "-q", "-b", "main", str(clone))
    shutil.copy(ROOT / "pyproject.toml", clone / "pyproject.toml")
    _git("add", "pyproject.toml", cwd=clone)
    _git("commit", "-q", "-m", "sources", cwd=clone)
    _git("remote", "add", "origin", str(bare), cwd=clone)
    (html / "_static").mkdir(parents=True)
    (html / "index.html").write_text("<html><body>the book</body></html>\n")
    (html / "_static" / "stego.css").write_text("pre { white-space: pre-wrap; }\n")
    return bare, clone, html


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git")
def test_make_publish_pushes_the_html_to_gh_pages(tmp_path):
    bare, clone, html = _clone_with_html(tmp_path)
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than the clone's pyproject.toml: make does not reinstall
    os.utime(clone / "pyproject.toml", (1, 1))
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, **GIT_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["make", "-C", str(clone), "-f", str(ROOT / "Makefile"), "publish", f"VENV={venv}",
                           f"STAMP={stamp}", f"HTML={html}", "REMOTE=origin"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = set(_git("--git-dir", str(bare), "ls-tree", "-r", "--name-only", "gh-pages").split())
    assert files == {".nojekyll", "index.html", "_static/stego.css"}  # the HTML, nothing of the sources
    assert _git("--git-dir", str(bare), "show", "gh-pages:index.html") == (html / "index.html").read_text()
    assert _git("log", "--format=%s", "main", cwd=clone).strip() == "sources"  # the sources' branch is untouched
    # publishing again replaces the site (a page that went away is gone)
    (html / "_static" / "stego.css").unlink()
    (html / "index.html").write_text("<html>second</html>\n")
    commit = publish.publish(html, remote="origin", repo=clone)
    assert _git("--git-dir", str(bare), "rev-parse", "gh-pages").strip() == commit
    assert set(_git("--git-dir", str(bare), "ls-tree", "-r", "--name-only", "gh-pages").split()) == {
        ".nojekyll", "index.html"}


def test_publish_refuses_what_it_cannot_publish(tmp_path):
    with pytest.raises(StegoError, match="--html: .* has no index.html; build the book first"):
        publish.publish(tmp_path, repo=tmp_path)
    (tmp_path / "index.html").write_text("x")
    with pytest.raises(StegoError, match="--repo: .* is not a git repository"):
        publish.publish(tmp_path, repo=tmp_path)


def test_the_repository_url_turns_on_the_buttons(tmp_path, monkeypatch):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    monkeypatch.delenv("STEGO_REPOSITORY_URL", raising=False)
    monkeypatch.delenv("STEGO_JUPYTERHUB_URL", raising=False)
    assert publish.repository_url(config) == ""  # the checkout's config: no URL, no buttons
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    assert publish.config_args(tmp_path) == []
    monkeypatch.setenv("STEGO_REPOSITORY_URL", "https://github.com/someone/stego-study/")
    monkeypatch.setenv("STEGO_JUPYTERHUB_URL", "https://hub.example.org/")
    args = publish.config_args(tmp_path)
    assert args[0] == "--config"
    built = yaml.safe_load(Path(args[1]).read_text())
    assert built["repository"]["url"] == "https://github.com/someone/stego-study"
    assert built["html"]["use_repository_button"] is True
    assert built["launch_buttons"]["binderhub_url"] == publish.BINDER_URL
    assert built["launch_buttons"]["colab_url"] == publish.COLAB_URL
    assert built["launch_buttons"]["jupyterhub_url"] == "https://hub.example.org"
    assert built["sphinx"] == config["sphinx"] and built["title"] == config["title"]  # the rest as it was
    assert Path(args[1]).is_relative_to(tmp_path / "_build")  # never rewrites the book's own _config.yml
    assert yaml.safe_load((tmp_path / "_config.yml").read_text()) == config
    with pytest.raises(StegoError, match="STEGO_REPOSITORY_URL: expected an http"):
        publish.launch_config(config, "git@github.com:someone/stego-study.git")


def test_the_pages_workflow_builds_with_the_readme_command():
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    steps = flow["jobs"]["build"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    readme = (ROOT / "README.md").read_text()
    assert runs == ["make book"] and "make book" in readme
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in flow["jobs"]["deploy"]["steps"])
    assert "STEGO_REPOSITORY_URL" in flow["jobs"]["build"]["env"]
    assert flow["permissions"]["pages"] == "write"


def test_binder_writes_the_chapters_the_launch_buttons_open():
    post = ROOT / "postBuild"
    assert post.stat().st_mode & stat.S_IXUSR
    text = post.read_text()
    assert "jupytext --to ipynb" in text and "book/chapters/" in text
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert any(isinstance(d, dict) and any(".[dev]" in p or p.startswith("-e .") for p in d["pip"])
               for d in env["dependencies"])
