"""Chapter 07's runs per protocol (quirks.protocol_runs): the original-protocol run is required; an absent
corrected-protocol run leaves its column empty with the command that trains it, so the paper profiles (which never
train from a downstream chapter) complete the chapter."""
from __future__ import annotations

import math

import pytest
from tinyruns import make_tiny_runs

from stego_core import quirks
from stego_core.runs import MissingRunError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quirk-runs")
    return root, make_tiny_runs(root, requests=(("stego", 6),))


def test_absent_corrected_run_is_a_note_not_an_error(tiny):
    root, made = tiny
    args = dict(train_store=made["train"], val_store=made["val"], root=root, progress=False, steps=4, batch_size=4,
                val_freq=2)
    pair = quirks.protocol_runs("demo", method="stego", code_dim=6, **args)
    assert pair["original"] is not None and pair["corrected"] is None
    assert "03_dimension_study" in pair["note"] and "-p protocol corrected" in pair["note"]
    assert math.isnan(quirks.best_metric(pair["corrected"], "cluster/mIoU"))
    assert quirks.best_metric(pair["original"], "cluster/mIoU") == pair["original"].info["metrics"]["cluster/mIoU"]
    # the original-protocol run stays required: a missing one stops the chapter with its command
    with pytest.raises(MissingRunError, match="no finished run of pca d=6") as err:
        quirks.protocol_runs("demo", method="pca", code_dim=6, **args)
    assert "03_dimension_study" in err.value.command
