"""Live logs of training runs: the ``logger`` parameter (``"none"`` or ``"tensorboard"``) of training and sweeps.

A 7,000-step run or a 30-run sweep takes hours; with ``logger="tensorboard"`` every run streams its training losses
(``train/loss/total``, ``train/loss/pos_intra``, ...), its validation metrics (``val/cluster/mIoU``, ...) and, at
every validation, a few example predictions (image | labels | linear-probe prediction, ``val/examples``) to
TensorBoard event files in ``<run folder>/tensorboard/``. Watch them with::

    tensorboard --logdir artifacts/runs        # every run and sweep under the artifacts root

TensorBoard is an optional extra (``pip install 'stego-study[tensorboard]'``); the demo does not need it. The
original STEGO logged to TensorBoard through PyTorch Lightning, stego-studies to Weights & Biases.

The training loop talks to a ``RunLogger`` (three calls and ``close``); ``make_logger`` builds the one a run asked
for. ``NullLogger`` (``"none"``) does nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import StegoError, check_choice

__all__ = ["LOGGERS", "RunLogger", "NullLogger", "TensorBoardLogger", "make_logger", "example_strip"]

LOGGERS = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"  # the event files' folder inside a run folder


class RunLogger:
    """What the training loop reports while it runs; every method is a no-op here."""

    def log_losses(self, step: int, logs: dict[str, float]) -> None:
        """Training losses (and other scalars) of ``step``."""

    def log_validation(self, step: int, metrics: dict[str, Any]) -> None:
        """Validation metrics of ``step`` (numbers only are logged)."""

    def log_examples(self, step: int, image: Any, label: Any, pred: Any, palette: Any) -> None:
        """A few validation images with their labels and predictions: image uint8 [B,H,W,3], label and pred
        int [B,H,W] (-1 = ignore), palette uint8 [K,3] (None: fixed colours)."""

    def close(self) -> None:
        """Flush and release the files."""


class NullLogger(RunLogger):
    """``logger="none"``: nothing is written."""


def example_strip(image: Any, label: Any, pred: Any, palette: Any) -> np.ndarray:
    """One uint8 [B, H, 3W, 3] strip per example: the image, its labels and the prediction side by side (ignored
    pixels black)."""
    image, label, pred = (np.asarray(a) for a in (image, label, pred))
    if palette is None:  # a store without a palette: fixed colours, one per id
        palette = np.random.default_rng(0).integers(40, 256, (int(max(label.max(), pred.max(), 0)) + 1, 3))
    colours = np.concatenate([np.asarray(palette, dtype=np.uint8).reshape(-1, 3), np.zeros((1, 3), np.uint8)])

    def paint(ids: np.ndarray) -> np.ndarray:  # [B,H,W] ids, -1 -> the black last row
        return colours[np.where((ids >= 0) & (ids < len(colours) - 1), ids, len(colours) - 1)]

    return np.concatenate([image.astype(np.uint8), paint(label), paint(pred)], axis=2)  # [B,H,3W,3]


class TensorBoardLogger(RunLogger):
    """Event files under ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, log_dir: str | os.PathLike, *, max_examples: int = 4):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise StegoError("logger: 'tensorboard' needs the tensorboard package; install it with "
                             "pip install 'stego-study[tensorboard]' (or pip install tensorboard), or use "
                             "logger='none'") from None
        self.log_dir = Path(log_dir)
        self.max_examples = max_examples
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_losses(self, step: int, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self._writer.add_scalar(f"train/{key}", float(value), step)

    def log_validation(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                self._writer.add_scalar(f"val/{key}", float(value), step)
        self._writer.flush()

    def log_examples(self, step: int, image: Any, label: Any, pred: Any, palette: Any) -> None:
        strip = example_strip(image, label, pred, palette)[: self.max_examples]
        self._writer.add_images("val/examples", strip, step, dataformats="NHWC")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def make_logger(kind: str, run_dir: str | os.PathLike) -> RunLogger:
    """The logger a run asked for: ``"none"`` -> ``NullLogger``; ``"tensorboard"`` -> event files in
    ``<run_dir>/tensorboard``."""
    check_choice("logger", kind, LOGGERS)
    if kind == "tensorboard":
        return TensorBoardLogger(Path(run_dir) / TENSORBOARD_DIR)
    return NullLogger()
