"""``stego-study explore`` in headless Chromium with the network cut except localhost: tiny runs in a temporary
artifacts folder, the server started as a subprocess on a free port, the method and the code dimension changed and a
photo uploaded; every change must change the displayed segmentation, and nothing may log an error or reach beyond
localhost. The server (and the kernels it started) are stopped at the end.

Uses Debian's /usr/bin/chromium through Playwright (skipped without it, failed under CI=true). With
STEGO_SCREENSHOTS=DIR the page's screenshot after the upload is written to DIR/explore.png (the README's picture).
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from test_browser import CHROMIUM, CHROMIUM_ARGS, _chromium_or_skip
from tinyruns import make_tiny_runs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
READY = ".stego-explore-status .stego-explore-ok"
LOCAL = ("127.0.0.1", "localhost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"stego-study explore exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"stego-study explore did not listen on {port} within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (Voilà shuts its kernels down), then SIGKILL to whatever of the server
    and its descendants (kernels run in sessions of their own) is left."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _chromium_or_skip()
    root = tmp_path_factory.mktemp("explore-artifacts")
    port = _free_port()
    log = tmp_path_factory.mktemp("explore-server") / "server.log"
    env = {**os.environ, "STEGO_ARTIFACTS": str(root), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stego_core.book.cli", "explore", "--port", str(port),
                                 "--no-browser"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent, start_new_session=True)
    try:
        make_tiny_runs(root)  # while the server starts: the app looks for runs when the page is opened
        _wait_for_port(port, proc, log)
        yield dict(url=f"http://127.0.0.1:{port}/", log=log, proc=proc)
    finally:
        _stop(proc)
    assert proc.poll() is not None


def _pixels(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"))


def _changed(page, locator, before: dict, what: str) -> dict:
    """Wait until the segmentation's src differs from ``before`` and the app says ready; its src and pixels."""
    page.wait_for_function("([sel, old]) => { const el = document.querySelector(sel); "
                           "return el && el.src && el.src !== old; }",
                           arg=[".stego-explore-segmentation", before["src"]], timeout=120_000)
    page.wait_for_selector(READY, timeout=120_000)
    now = {"src": locator.get_attribute("src"), "pixels": _pixels(locator)}
    assert now["pixels"].shape != before["pixels"].shape or not np.array_equal(now["pixels"], before["pixels"]), (
        f"{what}: the displayed segmentation did not change")
    return now


def test_explore_in_a_browser(server, tmp_path):
    t0 = time.monotonic()
    from playwright.sync_api import sync_playwright
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((160, 120)).save(photo)
    errors, blocked = [], []

    def route(r):
        if urlparse(r.request.url).hostname in LOCAL or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    # Playwright's sync API refuses a thread whose event loop an earlier in-process notebook run (papermill,
    # nest_asyncio) left marked as running; a fresh thread has none, so the test does not depend on test order.
    def drive():
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.route("**/*", route)
                page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page: {e}"))
                page.goto(server["url"], timeout=120_000)
                page.wait_for_selector(READY, timeout=180_000)
                print(f"page ready after {time.monotonic() - t0:.1f} s")
                seg = page.locator("img.stego-explore-segmentation")
                state = {"src": seg.get_attribute("src"), "pixels": _pixels(seg)}
                assert page.locator(".stego-legend-item").count() >= 1

                # the code dimension (STEGO runs at 6 and 12; the app opens on the middle one, 12)
                dim = page.locator(".stego-explore-dim select")
                assert dim.locator("option").all_inner_texts() == ["6", "12"]
                dim.select_option(label="6")
                state = _changed(page, seg, state, "dimension 12 -> 6")

                # the method (PCA has one run, at 6)
                page.locator(".stego-explore-method select").select_option(label="PCA")
                state = _changed(page, seg, state, "method STEGO -> PCA")
                assert page.locator(".stego-explore-dim select option").all_inner_texts() == ["6"]

                # your own photo
                with page.expect_file_chooser() as chooser:
                    page.locator(".stego-explore-upload").click()
                chooser.value.set_files(str(photo))
                state = _changed(page, seg, state, "upload")
                assert state["pixels"].shape[1] > state["pixels"].shape[0]  # the 4:3 photo, not a square store image
                chosen = page.locator(".stego-explore-image select").evaluate("el => el.options[el.selectedIndex].text")
                assert "upload" in chosen
                assert page.locator(".stego-legend-item").count() >= 1
                shots = Path(os.environ.get("STEGO_SCREENSHOTS") or tmp_path)
                shots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shots / "explore.png"), full_page=True)

                status = page.locator(".stego-explore-status")
                assert page.locator(".stego-explore-error").count() == 0, status.inner_text()
                # Voilà shows a failing cell's traceback or stderr as outputs
                stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                assert page.locator(stderr).count() == 0
                assert page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']").count() == 0
            finally:
                browser.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(drive).result()
    assert not blocked, f"the page asked for the network: {blocked}"
    assert not errors, "\n".join(errors)
    log = server["log"].read_text()
    assert "Traceback" not in log, log[-3000:]
