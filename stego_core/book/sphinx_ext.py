"""The book's Sphinx extension (``_config.yml``: ``sphinx.extra_extensions: [stego_core.book.sphinx_ext]``): one
copy of each script per page, the reader's CSS (``static/stego.css``: code wraps, tables scroll in their own
box, charts fit the column), and pages that paste glue rebuilt when the chapter they paste from changed."""
from __future__ import annotations

from pathlib import Path

from myst_nb.ext.glue.utils import PendingGlueReference

STATIC = Path(__file__).resolve().parent / "static"


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


def _add_static(app) -> None:
    """Serve this package's ``static/`` folder (the reader's CSS) with the book's own static files."""
    app.config.html_static_path.append(str(STATIC))


def setup(app) -> dict:
    """Sphinx extension hook (``_config.yml``: ``sphinx.extra_extensions: [stego_core.book.sphinx_ext]``)."""
    app.connect("html-page-context", _unique_scripts, priority=100)  # early: a later handler may end the event
    app.connect("doctree-read", _record_glue_sources)
    app.connect("env-get-outdated", _pages_pasting_from_changed)
    app.connect("env-purge-doc", _purge_glue_sources)
    app.connect("env-merge-info", _merge_glue_sources)
    app.connect("builder-inited", _add_static)
    app.add_css_file("stego.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}


