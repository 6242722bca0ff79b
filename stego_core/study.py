"""The study runner: profiles -> papermill runs of the text notebooks -> executed chapters -> the Jupyter Book; the CLI.

``stego-study run NOTEBOOK [-p name value ...] [--profile demo] [--force]``
    converts ``notebooks/NOTEBOOK.py`` (jupytext py:percent) to a notebook, executes it with papermill in a kernel
    that is this interpreter (``sys.executable``) and writes the executed chapter to ``book/chapters/NOTEBOOK.ipynb``.
    ``-p`` values are parsed like papermill's (YAML literals); names must exist in the notebook's ``parameters``
    cell and values must have the type of the default. A chapter whose notebook source and parameters hash to the
    key stored in its metadata is not executed again unless ``--force``.
``stego-study book [--profile demo] [--force] [--workdir DIR]``
    runs every notebook of the profile (``notebooks/profiles/NAME.yaml``), vendors the JavaScript the charts and
    widgets need (npm registry, once) and builds the book strictly (``jupyter-book build . -W -n --keep-going``).
``stego-study params NOTEBOOK``
    prints the notebook's parameters with their defaults and comments.
``stego-study vendor``
    only fetches the JavaScript into ``book/vendor/``.

A profile is YAML::

    parameters:            # shared: given to every notebook that has a parameter of that name
      dataset: mosaic
    notebooks:             # run in this order
      - notebook: 00_data
        parameters: {n_examples: 8}   # strict: each name must exist in that notebook

Offline JavaScript: Altair's charts (vega, vega-lite, vega-embed), the ipywidgets embed manager (with require.js)
and MathJax are fetched with ``npm pack`` into ``book/vendor/npm`` and unpacked into ``book/vendor/site/vendor``;
``_config.yml`` lists ``book/vendor/site`` in ``html_extra_path`` so Sphinx copies it to ``_build/html/vendor``,
outside ``_static`` (Jupyter Book loads every script under ``_static`` on every page).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jupytext
import nbformat
import yaml
from ipykernel.kernelspec import install
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from myst_nb.ext.glue.utils import PendingGlueReference

from .config import StegoError, repo_root
from .segment import main as segment_main

KERNEL_NAME = "stego-study"
CHAPTERS = Path("book") / "chapters"
VENDOR = Path("book") / "vendor"
# The npm packages served from <html>/vendor/: (folder, package, version, files to keep (tar members under package/)).
# vega / vega-lite / vega-embed match the major versions Altair writes its specs for (alt.VEGA_VERSION etc.).
VENDORED_JS = (
    ("vega", "vega", "6.4.0", ("build/vega.min.js",)),
    ("vega-lite", "vega-lite", "6.4.1", ("build/vega-lite.min.js",)),
    ("vega-embed", "vega-embed", "7.1.0", ("build/vega-embed.min.js",)),
    ("requirejs", "requirejs", "2.3.8", ("require.js",)),
    ("html-manager", "@jupyter-widgets/html-manager", "1.0.15", ("dist/",)),
    ("mathjax", "mathjax", "3.2.2", ("es5/",)),
)
# Parts of the packages above that no page uses (MathJax's speech-rule engine alone is ~20 MB).
# The pages use MathJax's tex-mml-chtml component and the widget manager's embed-amd bundle (with its fonts).
_VENDOR_SKIP = (".map", "es5/sre/", "es5/node-main.js", "es5/tex-chtml", "es5/tex-svg", "es5/mml-", "es5/tex-mml-svg",
                "es5/output/svg", "dist/embed.js", "dist/libembed-amd.js")
_VENDOR_LAYOUT = 4  # bump when the selection above changes, so existing vendor folders are unpacked again
# Loaded between require.js and the widget manager (see _config.yml): the manager finds its fonts relative to the
# URL require.js gives its module, which would otherwise be <page folder>/@jupyter-widgets/html-manager/dist/.
_WIDGETS_CONFIG_JS = """// Written by stego_core.study.vendor_js: serve the widget manager and its fonts from <book>/vendor/.
(function () {
  var vendor = new URL("../", document.currentScript.src).href;
  window.__jupyter_widgets_assets_path__ = vendor + "html-manager/";
  if (typeof window.requirejs === "function") {
    // every module of the bundle (base, controls, html-manager, .../dist/libembed-amd) -> vendor/html-manager/
    window.requirejs.config({paths: {"@jupyter-widgets": vendor + "html-manager",
                                     "@jupyter-widgets/html-manager/dist": vendor + "html-manager"}});
  }
})();
"""  # noqa: E501 (JavaScript)
# What a book copy (``--workdir``) needs from the checkout.
_BOOK_SOURCES = ("_config.yml", "_toc.yml", "book")
_BOOK_SKIP = {"chapters", "vendor", "_build"}


def _log(msg: str) -> None:
    print(f"[stego-study] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- notebooks & params
@dataclass(frozen=True)
class Parameter:
    """One line of a notebook's ``parameters`` cell."""

    name: str  # the variable name
    default: Any  # the literal it is assigned
    comment: str  # the comment that explains it ("" when there is none)


def notebook_path(notebook: str | os.PathLike, root: Path | None = None) -> Path:
    """``00_data`` / ``00_data.py`` / ``notebooks/00_data.py`` -> the jupytext source file."""
    root = root or repo_root()
    text = str(notebook)
    cands = [Path(text)] if text.endswith(".py") else []
    stem = Path(text).name.removesuffix(".py")
    cands += [root / "notebooks" / f"{stem}.py"]
    for cand in cands:
        if cand.is_file():
            return cand.resolve()
    known = sorted(p.stem for p in (root / "notebooks").glob("[0-9]*.py"))
    raise StegoError(f"notebook: {notebook!r} not found; expected one of {', '.join(known) or '(none)'} "
                     f"(files notebooks/NAME.py)")


def _parameters_cell(source: str, path: Path) -> tuple[str, int]:
    """The text of the cell tagged ``parameters`` in a py:percent file and its first line number (1-based)."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# %%") and "parameters" in line and "tags" in line:
            body = []
            for nxt in lines[i + 1:]:
                if nxt.startswith("# %%"):
                    break
                body.append(nxt)
            return "\n".join(body), i + 2
    raise StegoError(f"{path.name}: no cell tagged parameters; expected a first cell "
                     f"'# %% tags=[\"parameters\"]'")


def read_parameters(notebook: str | os.PathLike) -> list[Parameter]:
    """The parameters of a notebook: ``name = literal  # comment`` lines of its ``parameters`` cell, in order."""
    path = notebook_path(notebook)
    cell, first = _parameters_cell(path.read_text(), path)
    try:
        tree = ast.parse(cell)
    except SyntaxError as exc:
        raise StegoError(f"{path.name}: parameters cell line {first + (exc.lineno or 1) - 1}: {exc.msg}") from None
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(cell).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    cell_lines = cell.splitlines()
    params = []
    for node in tree.body:
        where = f"{path.name}: parameters cell line {first + node.lineno - 1}"
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise StegoError(f"{where}: expected 'name = literal  # comment', got {ast.unparse(node)!r}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise StegoError(f"{where}: {ast.unparse(node.value)!r} is not a literal; "
                             f"the parameters cell holds literals only") from None
        text = " ".join(comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments)
        if not text:  # a comment block right above the assignment
            above, n = [], node.lineno - 1
            while n >= 1 and cell_lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            text = " ".join(a for a in above if a)
        params.append(Parameter(node.targets[0].id, value, text))
    return params


def parse_value(text: str) -> Any:
    """A ``-p`` value as papermill reads it, extended to YAML literals: ``3``, ``0.5``, ``true``, ``[1, 2]``,
    ``None``."""
    if text in ("None", "null", "~"):
        return None
    if text in ("True", "False"):
        return text == "True"
    for number in (int, float):  # what papermill accepts, incl. 1e-3 that YAML 1.1 reads as text
        try:
            return number(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, list, dict)) or value is None else text


def parse_cli_parameters(notebook: str | os.PathLike, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``-p NAME VALUE`` pairs -> values: the text as is for string parameters, else :func:`parse_value`."""
    defaults = {p.name: p.default for p in read_parameters(notebook)}
    return {name: text if isinstance(defaults.get(name), str) else parse_value(text) for name, text in pairs}


def _type_name(value: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def check_parameters(notebook: str | os.PathLike, values: dict[str, Any], *, strict: bool = True,
                     source: str = "-p") -> dict[str, Any]:
    """Validate ``values`` against the notebook's parameters cell and return them coerced to the defaults' types.

    Unknown names raise a StegoError listing the valid ones (``strict=False`` drops them instead); a value whose type
    differs from the default's raises a StegoError (an int is accepted for a float; a ``None`` default takes anything;
    a string default takes the text as it was written).
    """
    params = {p.name: p for p in read_parameters(notebook)}
    name = notebook_path(notebook).stem
    out = {}
    for key, value in values.items():
        if key not in params:
            if not strict:
                continue
            raise StegoError(f"{source} {key}: {name} has no parameter {key!r}; valid names: {', '.join(params)}")
        default = params[key].default
        if default is None:  # a None default takes any value
            out[key] = value
            continue
        ok = (
            (isinstance(default, bool) and isinstance(value, bool))
            or (isinstance(default, int) and not isinstance(default, bool) and isinstance(value, int)
                and not isinstance(value, bool))
            or (isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (isinstance(default, str) and isinstance(value, str))
            or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))
            or (isinstance(default, dict) and isinstance(value, dict))
        )
        if not ok:
            raise StegoError(f"{source} {key}: expected {_type_name(default)} like the default {default!r}, "
                             f"got {_type_name(value)} {value!r}")
        out[key] = float(value) if isinstance(default, float) else value
    return out


# --------------------------------------------------------------------------------------------- profiles
def profile_path(profile: str | os.PathLike) -> Path:
    """``demo`` -> ``notebooks/profiles/demo.yaml``; a path to a YAML file is taken as is."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    cand = repo_root() / "notebooks" / "profiles" / f"{profile}.yaml"
    if cand.is_file():
        return cand
    known = sorted(p.stem for p in (repo_root() / "notebooks" / "profiles").glob("*.yaml"))
    raise StegoError(f"--profile: {profile!r} not found; expected one of {', '.join(known)} or a .yaml file")


def load_profile(profile: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The (notebook, validated parameters) pairs of a profile, in run order."""
    path = profile_path(profile)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StegoError(f"--profile: {path.name} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("notebooks"), list):
        raise StegoError(f"--profile: {path.name} needs a 'notebooks:' list of {{notebook: NAME, parameters: {{...}}}}")
    shared = doc.get("parameters") or {}
    runs = []
    for entry in doc["notebooks"]:
        entry = {"notebook": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "notebook" not in entry:
            raise StegoError(f"--profile: {path.name}: each notebooks entry needs 'notebook: NAME', got {entry!r}")
        nb = str(entry["notebook"])
        values = check_parameters(nb, shared, strict=False, source=f"{path.name} parameters:")
        values.update(check_parameters(nb, entry.get("parameters") or {}, source=f"{path.name} {nb}:"))
        runs.append((nb, values))
    return runs


# --------------------------------------------------------------------------------------------- execution
def ensure_kernel() -> str:
    """A kernelspec named ``stego-study`` whose python is this interpreter; installed into ``sys.prefix`` if needed."""
    with contextlib.suppress(NoSuchKernel):
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if spec.argv and spec.argv[0] == sys.executable:
            return KERNEL_NAME
    try:
        install(kernel_name=KERNEL_NAME, display_name="Python 3 (stego-study)", prefix=sys.prefix)
    except OSError:  # a read-only environment: a private kernel folder on JUPYTER_PATH
        prefix = Path(tempfile.gettempdir()) / f"stego-study-kernel-{os.getuid()}"
        install(kernel_name=KERNEL_NAME, display_name="Python 3 (stego-study)", prefix=str(prefix))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [str(prefix / "share" / "jupyter")] + [p for p in [os.environ.get("JUPYTER_PATH")] if p])
    return KERNEL_NAME


def run_key(notebook: str | os.PathLike, parameters: dict[str, Any]) -> str:
    """The hash that decides whether an executed chapter is current: notebook source + parameters."""
    text = notebook_path(notebook).read_text()
    blob = json.dumps({"source": text, "parameters": parameters}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RunResult:
    """What ``run_notebook`` did."""

    notebook: str  # the notebook's name
    output: Path  # the executed chapter
    parameters: dict  # the parameters it ran with
    skipped: bool  # True when the chapter was current and not executed again
    wall_s: float  # seconds spent


def run_notebook(notebook: str | os.PathLike, parameters: dict[str, Any] | None = None, *,
                 workdir: str | os.PathLike | None = None, force: bool = False,
                 log: Callable[[str], None] = _log) -> RunResult:
    """Execute one notebook with papermill into ``<workdir>/book/chapters/NAME.ipynb`` (skipped when current)."""
    t0 = time.perf_counter()
    src = notebook_path(notebook)
    name = src.stem
    params = check_parameters(src, parameters or {})
    chapters = Path(workdir or repo_root()) / CHAPTERS
    chapters.mkdir(parents=True, exist_ok=True)
    out = chapters / f"{name}.ipynb"
    key = run_key(src, params)
    if out.exists() and not force:
        with contextlib.suppress(Exception):
            meta = nbformat.read(out, as_version=4).metadata.get("stego_study", {})
            if meta.get("key") == key:
                log(f"{name}: up to date (key {key}), not executed again; --force reruns it")
                return RunResult(name, out, params, True, time.perf_counter() - t0)
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults"
    log(f"{name}: executing ({shown})")
    nb = _to_notebook(src)
    running = chapters / f".{name}.running.ipynb"
    failed = chapters / f".{name}.failed.ipynb"
    with tempfile.TemporaryDirectory() as tmp:
        nb_in = Path(tmp) / f"{name}.ipynb"
        nbformat.write(nb, nb_in)
        try:
            _execute(nb_in, running, params)
        except Exception as exc:  # papermill's execution error carries the cell's exception
            if running.exists():
                os.replace(running, failed)
            what = getattr(exc, "ename", type(exc).__name__)
            why = getattr(exc, "evalue", str(exc)).strip().splitlines()
            raise StegoError(f"{name}: the notebook failed ({what}: {why[-1] if why else ''}); "
                             f"the executed notebook with the traceback is {failed}") from None
    wall = time.perf_counter() - t0
    done = nbformat.read(running, as_version=4)
    done.metadata["stego_study"] = {"key": key, "parameters": params, "wall_s": round(wall, 2),
                                    "source": f"notebooks/{src.name}"}
    nbformat.write(done, running)
    os.replace(running, out)
    failed.unlink(missing_ok=True)
    log(f"{name}: done in {wall:.1f} s -> {out}")
    return RunResult(name, out, params, False, wall)


def _to_notebook(src: Path):
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (stego-study)",
                                 "language": "python"}
    nb.metadata.pop("jupytext", None)  # the chapter is a build product, not a paired file
    return nb


def _execute(nb_in: Path, nb_out: Path, params: dict[str, Any]) -> None:
    import papermill

    papermill.execute_notebook(str(nb_in), str(nb_out), parameters=params, kernel_name=ensure_kernel(),
                               cwd=str(repo_root()), progress_bar=False, log_output=False,
                               request_save_on_cell_execute=False)


def run_profile(profile: str | os.PathLike, *, workdir: str | os.PathLike | None = None, force: bool = False,
                log: Callable[[str], None] = _log) -> list[RunResult]:
    """Run every notebook of a profile, in order."""
    runs = load_profile(profile)
    return [run_notebook(nb, params, workdir=workdir, force=force, log=log) for nb, params in runs]


# --------------------------------------------------------------------------------------------- offline JavaScript
def vendor_js(dest: str | os.PathLike | None = None, *, force: bool = False,
              log: Callable[[str], None] = _log) -> Path:
    """Fetch the pinned npm packages (once) and unpack what the pages load into ``<dest>/site/vendor``."""
    dest = Path(dest) if dest is not None else repo_root() / VENDOR
    site = dest / "site" / "vendor"
    stamp = site / "VERSIONS.json"
    want = {folder: f"{pkg}@{ver}" for folder, pkg, ver, _ in VENDORED_JS} | {"layout": _VENDOR_LAYOUT}
    if not force and stamp.exists() and json.loads(stamp.read_text()) == want:
        return dest / "site"
    t0 = time.perf_counter()
    npm_dir = dest / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    missing = [f"{pkg}@{ver}" for _, pkg, ver, _ in VENDORED_JS if not _tarball(npm_dir, f"{pkg}@{ver}").exists()]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            raise StegoError("vendor: npm not found; install Node.js/npm (Debian: apt-get install npm) so the book "
                             "can fetch its JavaScript once, or copy book/vendor/ from a checkout that has it")
        log(f"vendor: npm pack {' '.join(missing)}")
        proc = subprocess.run([npm, "pack", "--silent", "--pack-destination", str(npm_dir), *missing],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise StegoError(f"vendor: npm pack failed ({last}); the book needs the npm registry once to fetch "
                             f"{', '.join(missing)}")
    tmp_site = Path(tempfile.mkdtemp(prefix=".site-", dir=dest))
    try:
        for folder, pkg, ver, keep in VENDORED_JS:
            with tarfile.open(_tarball(npm_dir, f"{pkg}@{ver}")) as tar:
                for member in tar.getmembers():
                    rel = member.name.removeprefix("package/")
                    if not member.isfile() or not any(rel.startswith(k) for k in keep):
                        continue
                    if any(s in rel for s in _VENDOR_SKIP) or ".." in Path(rel).parts:
                        continue
                    prefix = next(k for k in keep if rel.startswith(k))
                    inner = rel[len(prefix):] if prefix.endswith("/") else Path(rel).name  # dist/x.js -> x.js
                    target = tmp_site / "vendor" / folder / inner
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        (tmp_site / "vendor" / "stego").mkdir(parents=True)
        (tmp_site / "vendor" / "stego" / "widgets-config.js").write_text(_WIDGETS_CONFIG_JS)
        (tmp_site / "vendor" / "VERSIONS.json").write_text(json.dumps(want, indent=2) + "\n")
        old = dest / "site"
        if old.exists():
            shutil.rmtree(old)
        os.replace(tmp_site, old)
    finally:
        if tmp_site.exists():
            shutil.rmtree(tmp_site)
    log(f"vendor: JavaScript ready in {dest / 'site' / 'vendor'} ({time.perf_counter() - t0:.1f} s)")
    return dest / "site"


def _tarball(npm_dir: Path, spec: str) -> Path:
    pkg, ver = spec.rsplit("@", 1)
    return npm_dir / f"{pkg.lstrip('@').replace('/', '-')}-{ver}.tgz"


# --------------------------------------------------------------------------------------------- the book
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
                            ignore=lambda d, names, top=src: [n for n in names if Path(d) == top and n in _BOOK_SKIP])
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
               log: Callable[[str], None] = _log) -> Path:
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
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(workdir), *args]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    log("book: " + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)))
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
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
              log: Callable[[str], None] = _log) -> Path:
    """``stego-study book``: run the profile's notebooks into ``workdir`` (default: the checkout; another folder
    gets a copy of the book's sources), build the book there and return the path of ``index.html``."""
    t0 = time.perf_counter()
    workdir = prepare_workdir(workdir) if workdir is not None else repo_root()
    run_profile(profile, workdir=workdir, force=force, log=log)
    index = build_book(workdir, log=log)
    log(f"done in {time.perf_counter() - t0:.1f} s; open {index}")
    return index


def _unique_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop repeated <script> entries from a page (sphinx-thebe registers its inline config twice under
    Jupyter Book 1.x, and a second ``const THEBE_JS_URL`` is a JavaScript error on every page)."""
    seen, unique = set(), []
    for js in context.get("script_files", []):
        name = str(getattr(js, "filename", js) or "")  # the same inline script comes as filename None and ""
        key = (name, tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    if "script_files" in context:
        context["script_files"][:] = unique


def _glue_sources(env) -> dict[str, set[str]]:
    """page -> the documents it pastes glue from, kept on the Sphinx environment (pickled with it)."""
    if not hasattr(env, "stego_glue_sources"):
        env.stego_glue_sources = {}
    return env.stego_glue_sources


def _record_glue_sources(app, doctree) -> None:
    """Remember which documents a page pastes glue from (myst-nb's pending glue references)."""
    sources = _glue_sources(app.env)
    refs = {node.refdoc for node in doctree.findall(PendingGlueReference)}
    if refs:
        sources[app.env.docname] = refs
    else:
        sources.pop(app.env.docname, None)


def _pages_pasting_from_changed(app, env, added, changed, removed) -> list[str]:
    """Rebuild a page when a chapter it pastes from changed: Sphinx's incremental build would otherwise keep the
    page's old numbers (the pasting happens when the page is written, from the chapter's glue cache)."""
    touched = set(added) | set(changed) | set(removed)
    return sorted(doc for doc, refs in _glue_sources(env).items() if refs & touched and doc in env.found_docs)


def _purge_glue_sources(app, env, docname) -> None:
    _glue_sources(env).pop(docname, None)


def _merge_glue_sources(app, env, docnames, other) -> None:
    theirs = _glue_sources(other)
    _glue_sources(env).update({doc: theirs[doc] for doc in docnames if doc in theirs})


def setup(app) -> dict:
    """Sphinx extension hook (``_config.yml``: ``sphinx.extra_extensions: [stego_core.study]``)."""
    app.connect("html-page-context", _unique_scripts, priority=100)  # early: a later handler may end the event
    app.connect("doctree-read", _record_glue_sources)
    app.connect("env-get-outdated", _pages_pasting_from_changed)
    app.connect("env-purge-doc", _purge_glue_sources)
    app.connect("env-merge-info", _merge_glue_sources)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stego-study", description="Run the study's notebooks and build its book.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute one notebook into book/chapters/NAME.ipynb")
    run.add_argument("notebook", help="name of a notebook in notebooks/ (e.g. 00_data)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a parameter (repeatable); values are YAML literals like papermill's -p")
    run.add_argument("--profile", help="take this profile's parameters for the notebook first (e.g. demo)")
    run.add_argument("--force", action="store_true", help="execute even when the chapter is current")
    run.add_argument("--workdir", help="book folder to write into (default: the checkout)")
    sub.add_parser("segment", add_help=False,
                   help="segment your own images with a trained run or a released checkpoint (see its --help)")
    book = sub.add_parser("book", help="run a profile's notebooks and build the book")
    book.add_argument("--profile", default="demo", help="notebooks/profiles/NAME.yaml or a YAML path (demo)")
    book.add_argument("--force", action="store_true", help="execute every notebook even when current")
    book.add_argument("--workdir", help="build a copy of the book in this folder instead of the checkout")
    params = sub.add_parser("params", help="list a notebook's parameters with their comments")
    params.add_argument("notebook")
    sub.add_parser("vendor", help="fetch the book's JavaScript from the npm registry into book/vendor/")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stego-study`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["segment"]:  # its own argument parser: stego_core.segment
        return segment_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "params":
            for p in read_parameters(args.notebook):
                print(f"{p.name} = {p.default!r}" + (f"  # {p.comment}" if p.comment else ""))
        elif args.command == "vendor":
            vendor_js()
        elif args.command == "run":
            values: dict[str, Any] = {}
            if args.profile:
                values.update(dict(load_profile(args.profile)).get(notebook_path(args.notebook).stem, {}))
            values.update(parse_cli_parameters(args.notebook, args.parameter))
            workdir = prepare_workdir(args.workdir) if args.workdir else None
            run_notebook(args.notebook, values, workdir=workdir, force=args.force)
        elif args.command == "book":
            make_book(args.profile, workdir=args.workdir, force=args.force)
    except StegoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
