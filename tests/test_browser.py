"""The built book in headless Chromium with the network cut: every page loads without JavaScript errors, every
chart draws, widgets render; a screenshot per page goes to <build>/screenshots/.

Uses Debian's /usr/bin/chromium through Playwright (never a downloaded browser). Without chromium the test is
skipped, except under CI=true where it fails. Set STEGO_BOOK_HTML=path/to/_build/html to check an existing build
(e.g. after `make book`) instead of building the smoke book.

Page-specific checks: add a function ``check(page)`` to ``PAGE_CHECKS`` under the page's path relative to the html
root (e.g. ``"book/chapters/05_explorer.html"``); it runs after the generic checks with the loaded page.
"""
from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# Every chart on a page: vega-embed drew an SVG (or canvas) with at least one mark inside.
CHARTS_DRAWN = """() => {
  const charts = [...document.querySelectorAll('.stego-chart')];
  return charts.every(el => el.querySelector('.chart-wrapper canvas, svg [class*="mark-"] > *')
                             || el.querySelector('.stego-chart-error'));
}"""

# Data marks per chart: Vega draws the marks of the spec inside groups of class role-mark; axes, legends, titles and
# the frame are role-axis-* / role-legend-* / role-title / role-frame groups and do not count. A chart whose data
# is empty (or filtered away) has none.
CHART_DATA_MARKS = """() => [...document.querySelectorAll('.stego-chart')].map(
  el => el.querySelectorAll('svg g.role-mark > *:not(g)').length)"""
# Page layout: the first heading of the article comes before any code cell; horizontal overflow; each chart's drawing
# against the width of its column (the article's content box).
FIRST_HEADING_BEFORE_CODE = """() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const h1 = article.querySelector('h1');
  const cell = article.querySelector('div.cell');
  if (!h1) return 'no h1';
  if (cell && (cell.compareDocumentPosition(h1) & Node.DOCUMENT_POSITION_FOLLOWING)) return 'code cell before h1';
  return 'ok';
}"""
PAGE_OVERFLOW = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
CHARTS_TOO_WIDE = """() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const column = article.getBoundingClientRect().width;
  return [...document.querySelectorAll('.stego-chart svg.marks')]
    .map(svg => svg.getBoundingClientRect().width).filter(w => w > column + 1).map(w => [w, column]);
}"""
# The download button (every page has the page source; chapters the .ipynb) and, when the book was built with a
# repository URL, the launch buttons (Binder, Colab) on the executed chapters.
DOWNLOAD_IPYNB = "() => [...document.querySelectorAll('a[href$=\".ipynb\"]')].map(a => a.getAttribute('href'))"
LAUNCH_LINKS = "() => [...document.querySelectorAll('a[href*=\"mybinder.org\"], a[href*=\"colab.research\"]')]" \
               ".map(a => a.getAttribute('href'))"
# Pages that paste numbers from the chapters, and their Markdown sources (relative to the book's work folder).
PASTING_PAGES = {"book/findings.html": "book/findings.md", "book/results/table2.html": "book/results/table2.md",
                 "book/results/figure4.html": "book/results/figure4.md"}


def _check_widgets(page) -> None:
    """Pages that carry ipywidgets state must show the widgets (here: tqdm's progress bars)."""
    if page.locator('script[type="application/vnd.jupyter.widget-state+json"]').count():
        page.wait_for_selector(".jupyter-widgets", timeout=20_000)
        assert page.locator(".widget-progress, .jupyter-widgets").count() > 0


def _check_math(page) -> None:
    """MathJax (vendored) typeset the page's formulas."""
    page.wait_for_selector("mjx-container", timeout=20_000)
    assert page.locator("mjx-container mjx-math").count() > 0


PAGE_CHECKS: dict[str, Callable] = {
    "book/intro.html": _check_math,
    "book/chapters/01_features.html": _check_widgets,
}


def _chromium_or_skip() -> None:
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if ci:
            pytest.fail("playwright is not installed (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed")
    if not CHROMIUM.exists():
        if ci:
            pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium (make system-deps)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the browser checks need it")


@pytest.fixture(scope="session")
def html_root(request) -> Path:
    _chromium_or_skip()
    if os.environ.get("STEGO_BOOK_HTML"):
        return Path(os.environ["STEGO_BOOK_HTML"]).resolve()
    return request.getfixturevalue("smoke_html")  # built only when no book is given


@pytest.fixture(scope="session")
def server(html_root):
    handler = functools.partial(_QuietHandler, directory=str(html_root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test log clean
        pass


@pytest.fixture(scope="session")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _pages(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                  if p.relative_to(root).parts[0] not in ("_static", "vendor", "_sources"))


def test_every_page_renders_offline(html_root, server, browser):
    pages = _pages(html_root)
    assert "book/chapters/00_data.html" in pages or os.environ.get("STEGO_BOOK_HTML")
    shots = html_root.parent / "screenshots"
    (shots / "phone").mkdir(parents=True, exist_ok=True)
    problems: dict[str, list[str]] = {}
    n_charts = 0
    for rel in pages:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=False)
        page = context.new_page()
        found: list[str] = []
        page.on("console", lambda msg, found=found: msg.type == "error" and found.append(f"console: {msg.text}"))
        page.on("pageerror", lambda exc, found=found: found.append(f"pageerror: {exc}"))
        page.on("response", lambda resp, found=found: resp.status >= 400 and found.append(
            f"HTTP {resp.status}: {resp.url}"))

        def route(r, found=found):
            host = urlparse(r.request.url).hostname
            if r.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
                r.continue_()
            else:
                found.append(f"blocked network request: {r.request.url}")
                r.abort()

        page.route("**/*", route)
        page.goto(server + rel, wait_until="load")
        page.wait_for_load_state("networkidle")
        charts = page.locator(".stego-chart").count()
        if charts:
            page.wait_for_function(CHARTS_DRAWN, timeout=20_000)
            errors = page.locator(".stego-chart-error").all_inner_texts()
            found += [f"chart error: {e}" for e in errors]
            marks = page.evaluate(CHART_DATA_MARKS)
            found += [f"chart {i} draws no data marks" for i, n in enumerate(marks) if n == 0]
            found += [f"chart wider than its column: {w:.0f} > {c:.0f} px" for w, c in page.evaluate(CHARTS_TOO_WIDE)]
            embeds = page.locator(".stego-chart.vega-embed").count()
            assert embeds == charts, f"{rel}: {embeds} of {charts} charts were embedded"
            n_charts += charts
        if rel in PAGE_CHECKS:
            PAGE_CHECKS[rel](page)
        found += _reader_checks(page, rel, html_root)
        name = rel.replace("/", "__").removesuffix(".html") + ".png"
        page.screenshot(path=str(shots / name), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.wait_for_timeout(200)
        if (over := page.evaluate(PAGE_OVERFLOW)) > 1:
            found.append(f"page scrolls sideways by {over} px at 390 px")
        page.screenshot(path=str(shots / "phone" / name), full_page=True)
        if found:
            problems[rel] = found
        context.close()
    assert not problems, problems
    if not os.environ.get("STEGO_BOOK_HTML"):
        assert n_charts >= 3  # the smoke chapters hold 3 charts


def _launch_buttons_expected() -> bool:
    """The smoke book is built with a repository URL (conftest); a given build has one when the environment says so."""
    if os.environ.get("STEGO_BOOK_HTML"):
        return bool(os.environ.get("STEGO_REPOSITORY_URL"))
    return True


def _reader_checks(page, rel: str, html_root: Path) -> list[str]:
    """The reader's view at 1280 px: title first, no sideways scrolling, download / launch buttons, pasted numbers."""
    found = []
    first = page.evaluate(FIRST_HEADING_BEFORE_CODE)
    if first != "ok" and rel not in ("genindex.html", "search.html"):
        found.append(f"first heading: {first}")
    if (over := page.evaluate(PAGE_OVERFLOW)) > 1:
        found.append(f"page scrolls sideways by {over} px at 1280 px")
    if rel.startswith("book/chapters/"):
        stem = Path(rel).stem
        if not any(h.endswith(f"{stem}.ipynb") for h in page.evaluate(DOWNLOAD_IPYNB)):
            found.append("no download link to the chapter's .ipynb")
        if _launch_buttons_expected():
            links = page.evaluate(LAUNCH_LINKS)
            if not any("mybinder.org" in h and stem in h for h in links) or not any("colab" in h for h in links):
                found.append(f"launch buttons missing (configured): {links}")
        elif page.evaluate(LAUNCH_LINKS):
            found.append("launch buttons although no repository URL is configured")
    if rel in PASTING_PAGES:
        from chapters import missing_pasted_numbers

        source = html_root.parents[1] / PASTING_PAGES[rel]
        text = page.inner_text("article.bd-article")
        found += [f"pasted number not on the page: {m}" for m in missing_pasted_numbers(text, source)]
    return found


def test_a_chart_without_data_counts_no_marks(html_root, server, browser, tmp_path):
    """The data-mark probe fails an empty chart: the same chart with and without rows, on a page next to the book's
    own vendored JavaScript."""
    import altair as alt
    import pandas as pd

    from stego_core.book import viz

    site = tmp_path / "site"
    (site / "_static").mkdir(parents=True)
    (site / "_static" / "documentation_options.js").write_text("")  # the loader finds ../vendor/ from it
    os.symlink(html_root / "vendor", site / "vendor")
    frames = {"full": pd.DataFrame({"D": [3, 6, 12], "mIoU": [20.0, 24.0, 23.0]}),
              "empty": pd.DataFrame({"D": pd.Series(dtype=float), "mIoU": pd.Series(dtype=float)})}
    for name, df in frames.items():
        chart = alt.Chart(df).mark_line(point=True).encode(x="D:Q", y="mIoU:Q")
        (site / f"{name}.html").write_text('<html><head><script src="_static/documentation_options.js"></script>'
                                           f"</head><body>{viz.chart_html(chart.to_dict())}</body></html>")
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        counts = {}
        for name in frames:
            page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/{name}.html", wait_until="load")
            page.wait_for_function(CHARTS_DRAWN, timeout=20_000)
            counts[name] = page.evaluate(CHART_DATA_MARKS)
            assert page.locator(".stego-chart svg g.role-axis").count() > 0  # the axes are drawn either way
        context.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert counts["empty"] == [0]
    assert counts["full"][0] >= 3 + 1  # three points and the line


# --------------------------------------------------------------------------------------------- the explorer (05)
# Added by the evaluation/explorer chapter: changing an explorer control swaps the pictures (no kernel involved).
_EXPLORER_HREFS = "() => [...document.querySelectorAll('.stego-chart svg image')].map(e => e.getAttribute('href'))"


def _explorer_hrefs_after(page, action) -> list[str]:
    before = page.evaluate(_EXPLORER_HREFS)
    action()
    page.wait_for_function(f"(before) => JSON.stringify(({_EXPLORER_HREFS})()) !== JSON.stringify(before)",
                           arg=before, timeout=10_000)
    return page.evaluate(_EXPLORER_HREFS)


def test_explorer_controls_change_the_pictures(html_root, server, browser):
    rel = "book/chapters/05_explorer.html"
    if not (html_root / rel).exists():
        pytest.skip(f"{rel} is not part of this build")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith((server, "data:", "blob:"))
               else (errors.append(f"blocked {r.request.url}"), r.abort()))
    page.goto(server + rel, wait_until="load")
    page.wait_for_function(CHARTS_DRAWN, timeout=20_000)
    page.wait_for_function("() => document.querySelectorAll('.stego-chart svg image').length >= 5", timeout=20_000)
    first = page.evaluate(_EXPLORER_HREFS)
    assert all(h.startswith("data:image/") for h in first)

    method = page.locator('.stego-chart select[name="method"]')
    options = method.locator("option").all_inner_texts()
    assert len(options) >= 2
    after_method = _explorer_hrefs_after(page, lambda: method.select_option(options[1]))
    photos = [h for h in first if h.startswith("data:image/jpeg")]
    assert [h for h in after_method if h.startswith("data:image/jpeg")] == photos  # same image, other prediction

    item = page.locator('.stego-chart select[name="image_id"]')
    after_item = _explorer_hrefs_after(page, lambda: item.select_option(index=1))
    assert set(h for h in after_item if h.startswith("data:image/jpeg")).isdisjoint(photos)  # another photo
    assert not errors, errors
    context.close()
