"""Shared test settings: offline model hubs, deterministic CPU torch, small thread counts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# the tests never fetch the book's JavaScript (nor write it into the checkout): `make test` runs `make vendor` first
os.environ.setdefault("STEGO_VENDOR_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state (Python, numpy, torch), whatever ran before it: a test's
    draws do not depend on the order the tests run in (``pytest -p randomly`` shuffles it)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def golden():
    """The public reference values computed with the original code (../shared/reference/golden-public.json)."""
    import json
    from pathlib import Path

    here = Path(__file__).resolve().parent
    shared = here.parent.parent / "shared" / "reference" / "golden-public.json"
    for cand in (here / "golden" / "golden-public.json", shared):
        if cand.exists():
            return json.loads(cand.read_text())
    pytest.fail("golden-public.json not found: tests/golden/golden-public.json is part of the checkout (a copy of "
                "shared/reference/golden-public.json); restore it instead of skipping the reference checks")


SMOKE_REPOSITORY_URL = "https://github.com/stego-study/stego-study"  # never fetched: the browser tests cut the net


@pytest.fixture(scope="session")
def smoke_html(tmp_path_factory):
    """The smoke profile's book, built once per session into <basetemp>/smoke-book; its HTML folder."""
    from stego_core import study
    from stego_core.book.vendor import vendor_ready

    if not vendor_ready():
        reason = "book/vendor/ is not prepared: run `make vendor` once (it fetches the book's JavaScript from npm)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    base = tmp_path_factory.getbasetemp()
    index = base / "smoke-book" / "_build" / "html" / "index.html"
    if not index.exists():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STEGO_ARTIFACTS", str(base / "smoke-artifacts"))
            mp.setenv("STEGO_REPOSITORY_URL", SMOKE_REPOSITORY_URL)  # the launch buttons get checked too
            index = study.make_book("smoke", workdir=base / "smoke-book")
    return index.parent
