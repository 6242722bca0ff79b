"""Shared test settings: offline model hubs, deterministic CPU torch, small thread counts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def golden():
    """The public reference values computed with the original code (../shared/reference/golden-public.json)."""
    import json
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for cand in (here / "golden" / "golden-public.json", here.parent.parent / "shared" / "reference" / "golden-public.json"):
        if cand.exists():
            return json.loads(cand.read_text())
    pytest.skip("golden-public.json not found")
