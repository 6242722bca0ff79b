"""The live training logs (stego_core.runlog): TensorBoard event files that read back with TensorBoard's own
EventAccumulator, and the "none" logger that writes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from stego_core import runlog
from stego_core.config import StegoError


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = runlog.make_logger("tensorboard", tmp_path)
    for step, loss in ((10, 0.5), (20, 0.25)):
        log.log_losses(step, {"loss/total": loss, "loss/pos_intra": -loss})
    log.log_validation(20, {"cluster/mIoU": 41.5, "linear/Accuracy": 80.0, "n_images": 4, "note": "text"})
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    label = rng.integers(-1, 3, (3, 8, 10))
    log.log_examples(20, image, label, np.zeros((3, 8, 10), dtype=np.int64), [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    log.close()

    acc = EventAccumulator(str(tmp_path / runlog.TENSORBOARD_DIR), size_guidance={"images": 0}).Reload()
    losses = acc.Scalars("train/loss/total")
    assert [(e.step, e.value) for e in losses] == [(10, 0.5), (20, 0.25)]
    assert acc.Scalars("train/loss/pos_intra")[-1].value == pytest.approx(-0.25)
    assert acc.Scalars("val/cluster/mIoU")[0].value == pytest.approx(41.5)
    assert "val/note" not in acc.Tags()["scalars"]  # only numbers are logged
    images = acc.Images("val/examples")  # one grid per validation: the 3 strips (image | labels | prediction)
    assert len(images) == 1 and images[0].step == 20 and (images[0].width, images[0].height) == (3 * 30, 8)
    import io

    from PIL import Image

    grid = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
    assert (grid[:, :10] == image[0]).all()  # the first strip starts with the first image


def test_example_strip_paints_labels_and_predictions():
    image = np.full((1, 2, 2, 3), 7, dtype=np.uint8)
    label = np.array([[[0, 1], [-1, 1]]])
    pred = np.array([[[1, 1], [0, 0]]])
    strip = runlog.example_strip(image, label, pred, [(10, 20, 30), (40, 50, 60)])
    assert strip.shape == (1, 2, 6, 3)
    assert (strip[0, :, :2] == 7).all()  # the image
    assert strip[0, 0, 2].tolist() == [10, 20, 30] and strip[0, 1, 2].tolist() == [0, 0, 0]  # -1 -> black
    assert strip[0, 0, 4].tolist() == [40, 50, 60]


def test_none_writes_nothing_and_unknown_is_refused(tmp_path):
    log = runlog.make_logger("none", tmp_path)
    log.log_losses(1, {"loss/total": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StegoError, match="logger"):
        runlog.make_logger("wandb", tmp_path)


def test_training_and_sweep_stream_to_tensorboard(tmp_path):
    """logger="tensorboard": a run's losses at its logging steps, its validation metrics at every validation and
    the example predictions land in <run folder>/tensorboard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_training import FakeStore, _cfg, _synthetic, _with_knn

    from stego_core import training

    train_store = _with_knn(FakeStore(tmp_path / "train", *_synthetic(32, 0), split="train"))
    val_store = FakeStore(tmp_path / "val", *_synthetic(8, 1), split="val")
    result = training.train(_cfg(steps=20, val_freq=10), train_store=train_store, val_store=val_store,
                            root=tmp_path / "art", progress=False, logger="tensorboard")
    acc = EventAccumulator(str(result.run_dir / runlog.TENSORBOARD_DIR), size_guidance={"images": 0}).Reload()
    history = result.history
    train_rows = history[(history.split == "train") & (history.metric == "loss/total")]
    logged = acc.Scalars("train/loss/total")
    assert [e.step for e in logged] == train_rows.step.tolist() == [10, 20]
    assert [e.value for e in logged] == pytest.approx(train_rows.value.tolist())
    val_rows = history[(history.split == "val") & (history.metric == "cluster/mIoU")]
    assert [e.value for e in acc.Scalars("val/cluster/mIoU")] == pytest.approx(val_rows.value.tolist())
    assert [e.step for e in acc.Images("val/examples")] == val_rows.step.tolist()

    # the default writes nothing
    quiet = training.train(_cfg(steps=20, val_freq=10, seed=1), train_store=train_store, val_store=val_store,
                           root=tmp_path / "art", progress=False)
    assert not (quiet.run_dir / runlog.TENSORBOARD_DIR).exists()


def test_sweep_hands_the_logger_to_every_run_without_changing_its_key(tmp_path):
    from stego_core.sweep import SweepGrid, run_sweep

    seen = []

    def run_fn(spec, *, run_dir, root, progress):
        seen.append(spec.logger)

    grid = SweepGrid(presets=["demo"], methods=["pca", "rp"], dims=[3], seeds=[0])
    keys = [s.config_hash for s in grid.runs()]
    result = run_sweep(grid, root=tmp_path, run_fn=run_fn, progress=False, logger="tensorboard")
    assert seen == ["tensorboard", "tensorboard"] and [s.config_hash for s in result.specs] == keys
    with pytest.raises(StegoError, match="logger"):
        run_sweep(grid, root=tmp_path / "other", run_fn=run_fn, progress=False, logger="wandb")
