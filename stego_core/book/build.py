"""The Jupyter Book build: copy the book's sources into a work folder, leave out chapters not executed yet, build
strictly (``jupyter-book build . -W -n --keep-going``); ``make_book`` runs a profile first (``stego-study book``)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..config import StegoError, repo_root
from .publish import config_args
from .runner import CHAPTERS, log, run_profile
from .vendor import VENDOR, vendor_js

# What a book copy (``--workdir``) needs from the checkout.
_BOOK_SOURCES = ("_config.yml", "_toc.yml", "book")
_BOOK_SKIP = {"chapters", "vendor", "_build"}


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Copy the book's sources (``_config.yml``, ``_toc.yml``, ``book/`` minus generated parts) into ``workdir``."""
    workdir = Path(workdir).resolve()
    root = repo_root()
    if workdir == root:
        return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    for item in _BOOK_SOURCES:
        src = root / item
        if src.is_dir():
            shutil.copytree(src, workdir / item, dirs_exist_ok=True,
                            ignore=lambda d, names, src=src: [n for n in names if Path(d) == src and n in _BOOK_SKIP])
        else:
            shutil.copy2(src, workdir / item)
    return workdir


def _toc_entries(node: Any):
    """Yield every ``file:`` of a _toc.yml structure."""
    if isinstance(node, dict):
        if "file" in node:
            yield node["file"]
        for value in node.values():
            yield from _toc_entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _toc_entries(value)


_PASTE = re.compile(r"(?:\{glue(?::\w+)?\}`|:doc:\s*)([^`\s]+?\.ipynb)(?:::|\s*$)", re.MULTILINE)


def pasted_from(text: str) -> list[str]:
    """The notebooks (paths relative to the page) that a MyST page pastes glue from: ``{glue:text}`path::key```
    roles and ``:doc: path`` options of glue directives."""
    return sorted(set(_PASTE.findall(text)))


def page_ready(workdir: str | os.PathLike, entry: str) -> bool:
    """Whether the _toc.yml ``entry`` can be built in ``workdir``: a chapter once it has been executed, a Markdown
    page once every chapter it pastes glue from has been."""
    workdir = Path(workdir)
    if entry.startswith(CHAPTERS.as_posix() + "/"):
        return (workdir / f"{entry}.ipynb").exists()
    page = workdir / f"{entry}.md"
    if not page.exists():
        return True  # not a Markdown page of ours: Jupyter Book reports it if it is missing
    return all((page.parent / ref).resolve().exists() for ref in pasted_from(page.read_text()))


def _prune_toc(node: Any, keep: Callable[[str], bool]) -> Any:
    """The toc without the ``file:`` entries ``keep`` refuses (and without parts that end up empty)."""
    if isinstance(node, list):
        items = [_prune_toc(v, keep) for v in node if not (isinstance(v, dict) and "file" in v and not keep(v["file"]))]
        return [v for v in items if not (isinstance(v, dict) and "chapters" in v and not v["chapters"]
                                         and "file" not in v)]
    if isinstance(node, dict):
        return {k: _prune_toc(v, keep) for k, v in node.items()}
    return node


def build_book(workdir: str | os.PathLike | None = None, *, strict: bool = True,
               log: Callable[[str], None] = log) -> Path:
    """Build the HTML book in ``workdir`` (default: the checkout) and return the path of its ``index.html``.

    Chapters listed in ``_toc.yml`` that have not been executed are left out of this build (with a note).
    """
    workdir = Path(workdir or repo_root()).resolve()
    t0 = time.perf_counter()
    vendor_js(repo_root() / VENDOR, log=log)
    site = workdir / VENDOR / "site"
    if workdir != repo_root():
        if site.exists():
            shutil.rmtree(site)
        shutil.copytree(repo_root() / VENDOR / "site", site)
    toc_file = workdir / "_toc.yml"
    toc = yaml.safe_load(toc_file.read_text())

    executed = functools.partial(page_ready, workdir)
    absent = [e for e in _toc_entries(toc) if not executed(e)]
    args = []
    if absent:
        log("book: leaving out chapters not executed yet: " + ", ".join(Path(a).name for a in absent)
            + " (stego-study run NAME)")
        pruned = workdir / "_build" / ".toc-built.yml"
        pruned.parent.mkdir(parents=True, exist_ok=True)
        pruned.write_text(yaml.safe_dump(_prune_toc(toc, executed), sort_keys=False))
        args += ["--toc", str(pruned)]
    args += config_args(workdir)  # the repository URL setting: repository and launch buttons
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(workdir), *args]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    log("book: " + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)))
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "WARNING" in ln or "ERROR" in ln]
        print(tail, file=sys.stderr)
        raise StegoError(f"book: jupyter-book build failed with {len(warnings)} warning(s)/error(s)"
                         + (f", first: {warnings[0].strip()}" if warnings else "") + " (output above)")
    index = workdir / "_build" / "html" / "index.html"
    log(f"book: built in {time.perf_counter() - t0:.1f} s -> {index}")
    return index


def make_book(profile: str | os.PathLike = "demo", *, workdir: str | os.PathLike | None = None, force: bool = False,
              log: Callable[[str], None] = log) -> Path:
    """``stego-study book``: run the profile's notebooks into ``workdir`` (default: the checkout; another folder
    gets a copy of the book's sources), build the book there and return the path of ``index.html``."""
    t0 = time.perf_counter()
    workdir = prepare_workdir(workdir) if workdir is not None else repo_root()
    run_profile(profile, workdir=workdir, force=force, log=log)
    index = build_book(workdir, log=log)
    log(f"done in {time.perf_counter() - t0:.1f} s; open {index}")
    return index

