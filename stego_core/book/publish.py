"""Publishing the book: one setting for the repository's URL, and ``make publish`` (``stego-study publish``).

The repository URL comes from ``$STEGO_REPOSITORY_URL`` or, when that is unset, from ``repository.url`` in
``_config.yml``. When it is set, the build (:func:`config_args`) turns on the repository and issues buttons and the
launch buttons: Binder (``mybinder.org``, which builds the environment from ``environment.yml``; its ``postBuild``
writes the chapters' notebooks from ``notebooks/``), Colab, and a JupyterHub when ``$STEGO_JUPYTERHUB_URL`` is set.
Without a URL the book has none of these buttons (only the page's download button).

:func:`publish` puts the built HTML on a ``gh-pages`` branch with ghp-import and pushes it (GitHub Pages serves
that branch; ``.nojekyll`` keeps the ``_static`` folders).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config import StegoError, repo_root

__all__ = ["BINDER_URL", "COLAB_URL", "repository_url", "launch_config", "config_args", "publish"]

BINDER_URL = "https://mybinder.org"
COLAB_URL = "https://colab.research.google.com"


def repository_url(config: dict[str, Any] | None = None) -> str:
    """``$STEGO_REPOSITORY_URL``, else ``repository.url`` of the book's config; "" when neither is set."""
    env = os.environ.get("STEGO_REPOSITORY_URL", "").strip()
    if env:
        return env.rstrip("/")
    return str(((config or {}).get("repository") or {}).get("url") or "").strip().rstrip("/")


def launch_config(config: dict[str, Any], url: str, *, jupyterhub_url: str = "", branch: str = "main") -> dict:
    """A copy of a Jupyter Book config with the repository ``url`` and every button that needs it turned on."""
    if not url.startswith(("https://", "http://")):
        raise StegoError(f"STEGO_REPOSITORY_URL: expected an http(s) URL like https://github.com/OWNER/REPO, "
                         f"got {url!r}")
    out = dict(config)
    out["repository"] = {**(config.get("repository") or {}), "url": url, "path_to_book": "", "branch": branch}
    out["html"] = {**(config.get("html") or {}), "use_repository_button": True, "use_issues_button": True}
    launch = {**(config.get("launch_buttons") or {}), "binderhub_url": BINDER_URL, "colab_url": COLAB_URL,
              "notebook_interface": "jupyterlab"}
    if jupyterhub_url:
        launch["jupyterhub_url"] = jupyterhub_url.rstrip("/")
    out["launch_buttons"] = launch
    return out


def config_args(workdir: Path) -> list[str]:
    """``jupyter-book build`` arguments for the repository setting: ``--config`` a derived config under
    ``_build/`` when a URL is set, nothing otherwise (the checkout's ``_config.yml`` is never rewritten)."""
    source = Path(workdir) / "_config.yml"
    config = yaml.safe_load(source.read_text()) or {}
    url = repository_url(config)
    if not url:
        return []
    derived = launch_config(config, url, jupyterhub_url=os.environ.get("STEGO_JUPYTERHUB_URL", ""),
                            branch=os.environ.get("STEGO_REPOSITORY_BRANCH", "main"))
    target = Path(workdir) / "_build" / ".config-built.yml"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(derived, sort_keys=False, allow_unicode=True))
    os.replace(tmp, target)
    return ["--config", str(target)]


def publish(html: str | os.PathLike | None = None, *, remote: str = "origin", branch: str = "gh-pages",
            repo: str | os.PathLike | None = None, push: bool = True, message: str | None = None) -> str:
    """Commit the built HTML (default ``_build/html`` of the checkout) to ``branch`` of the git repository ``repo``
    (default: the current directory) with ghp-import and push it to ``remote`` (a remote name or a URL / path).
    Returns the commit id of ``branch``."""
    html = Path(html) if html is not None else repo_root() / "_build" / "html"
    if not (html / "index.html").is_file():
        raise StegoError(f"--html: {html} has no index.html; build the book first (make book)")
    cwd = Path(repo) if repo is not None else Path.cwd()
    probe = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=cwd, capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise StegoError(f"--repo: {cwd} is not a git repository; publish runs inside the book's clone")
    cmd = [sys.executable, "-m", "ghp_import", "--no-jekyll", "--force", "--branch", branch, "--remote", remote,
           "--message", message or "Publish the book (stego-study publish)"]
    cmd += ["--push"] if push else []
    proc = subprocess.run([*cmd, str(html.resolve())], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise StegoError(f"publish: ghp-import failed ({last}); is --remote {remote!r} a remote of {cwd}?")
    head = subprocess.run(["git", "rev-parse", branch], cwd=cwd, capture_output=True, text=True, check=True)
    return head.stdout.strip()
