"""Offline JavaScript for the book.

Altair's charts (vega, vega-lite, vega-embed), the ipywidgets embed manager (with require.js) and MathJax are fetched
with ``npm pack`` into ``book/vendor/npm`` and unpacked into ``book/vendor/site/vendor``; ``_config.yml`` lists
``book/vendor/site`` in ``html_extra_path`` so Sphinx copies it to ``_build/html/vendor``, outside ``_static``
(Jupyter Book loads every script under ``_static`` on every page).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..config import StegoError, repo_root
from .runner import log

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
_WIDGETS_CONFIG_JS = """// Written by stego_core.book.vendor: the widget manager and its fonts come from <book>/vendor/.
(function () {
  var vendor = new URL("../", document.currentScript.src).href;
  window.__jupyter_widgets_assets_path__ = vendor + "html-manager/";
  if (typeof window.requirejs === "function") {
    // every module of the bundle (base, controls, html-manager, .../dist/libembed-amd) -> vendor/html-manager/
    window.requirejs.config({paths: {"@jupyter-widgets": vendor + "html-manager",
                                     "@jupyter-widgets/html-manager/dist": vendor + "html-manager"}});
  }
})();
"""
# What a book copy (``--workdir``) needs from the checkout.


# Set (to 1) where nothing may be fetched or written into the checkout, e.g. by the test suite: a missing or
# outdated vendor folder is then an error naming ``make vendor`` instead of an npm call.
OFFLINE_ENV = "STEGO_VENDOR_OFFLINE"


def _wanted() -> dict:
    return {folder: f"{pkg}@{ver}" for folder, pkg, ver, _ in VENDORED_JS} | {"layout": _VENDOR_LAYOUT}


def vendor_ready(dest: str | os.PathLike | None = None) -> bool:
    """Whether ``<dest>/site/vendor`` (default the checkout's ``book/vendor``) holds the pinned packages."""
    stamp = (Path(dest) if dest is not None else repo_root() / VENDOR) / "site" / "vendor" / "VERSIONS.json"
    return stamp.exists() and json.loads(stamp.read_text()) == _wanted()


def vendor_js(dest: str | os.PathLike | None = None, *, force: bool = False,
              log: Callable[[str], None] = log) -> Path:
    """Fetch the pinned npm packages (once) and unpack what the pages load into ``<dest>/site/vendor``.

    With the environment variable ``STEGO_VENDOR_OFFLINE=1`` nothing is fetched: a missing folder is a StegoError
    (``make vendor`` prepares it once; ``make test`` does that before the tests)."""
    dest = Path(dest) if dest is not None else repo_root() / VENDOR
    site = dest / "site" / "vendor"
    want = _wanted()
    if not force and vendor_ready(dest):
        return dest / "site"
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise StegoError(f"vendor: {site} is missing or out of date and {OFFLINE_ENV} forbids fetching it; run "
                         f"`make vendor` once (it needs the npm registry) before building the book")
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
                              capture_output=True, text=True, check=False)
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


