"""The catalogue of faults and bad inputs the tests inflict on the study, with what happens in each.

``CASES`` is the one list: ``tests/test_reliability.py`` runs every case and checks that what happens still matches
``expect`` (a regular expression searched in the message or summary the case produces), and the book's reliability
page renders the same list (``cases_table``). A case whose behaviour changes therefore fails ``make test`` before
the page can say something untrue. Kill cases run ``tests/faults.py`` (a few trials each in the test; the full
count of trials is ``benchmarks/kill_harness.py``'s).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

__all__ = ["Case", "CASES", "FAULTS", "cases_table"]

# The kinds of faults, in the page's order.
FAULTS = ("killed mid-write", "two at once", "full disk", "corrupt or mislabeled file",
          "unsafe checkpoint", "wrong device")


@dataclass(frozen=True)
class Case:
    """One fault or bad input and what the study does about it."""

    id: str  # stable name; the test's check function of the same name produces the outcome
    fault: str  # one of FAULTS
    target: str  # the stage or artifact it hits
    action: str  # what the test does
    outcome: str  # what happens (the page's words)
    expect: str  # regular expression the produced message / summary must match
    slow: bool = False  # runs processes for seconds to minutes (pytest's slow mark)


def _kill(stage: str, target: str, outcome: str) -> Case:
    return Case(f"kill_{stage}", "killed mid-write", target,
                "SIGKILL at a seeded random moment, read the artifact, restart, compare with an uninterrupted run",
                outcome, r"\b0 corrupt, 0 lost\b", slow=True)


CASES: tuple[Case, ...] = (
    _kill("features", "feature store", "does not open until its COMPLETE marker exists; the rerun computes only "
          "the missing chunks and says where it resumes"),
    _kill("knn", "kNN table", "the table file is renamed into place whole; the rerun rebuilds a missing table"),
    _kill("fivecrop", "five-crop tree", "counts as done only with its done marker; the rerun writes the missing "
          "crops and deletes temporary files"),
    _kill("training", "training run", "checkpoints are renamed into place whole; the rerun resumes from the last "
          "checkpoint and ends bit-identical"),
    _kill("sweep", "dimension sweep", "finished runs keep their DONE marker; the rerun resumes the interrupted run"),
    _kill("projected", "h-NNE projected store", "opens only with DONE; the rerun continues from the recorded "
          "progress"),
    _kill("evaluation", "Table 2 evaluation with the CRF pool", "the results file appears whole or not at all; "
          "CRF workers die with their parent"),
    _kill("explorer", "explorer precomputation", "the precomputed table appears whole or not at all"),
    _kill("book", "stego-study book", "a chapter being replaced is removed first, so the book never shows a stale or "
          "half-written chapter; the rerun executes it again"),
    Case("busy_lock_message", "two at once", "any keyed artifact",
         "a second process asks for an artifact that is being written, without waiting",
         "stops at once with a message naming the artifact and the pid holding it", r"is being written by process \d+"),
    Case("waiting_lock_message", "two at once", "any keyed artifact", "a second process asks and waits",
         "says which process it waits for, then proceeds once the holder is done", r"waiting for it to finish"),
    Case("stale_lock_message", "two at once", "any keyed artifact", "the lock holder was killed with SIGKILL",
         "the OS freed the lock; the next process takes over at once and names the dead holder",
         r"taking over .* died while writing it \(no longer running\)"),
    Case("two_feature_caches", "two at once", "feature store", "two processes cache the same store at once",
         "one computes every chunk exactly once, the other waits and opens the finished store",
         r"feature store .* is being written by process \d+", slow=True),
    Case("full_disk_feature_store", "full disk", "feature store", "ENOSPC while writing a chunk",
         "finished chunks kept, temporary files removed, one line naming the folder, the store's size by the cost "
         "model and STEGO_ARTIFACTS; a rerun with space resumes", r"disk is full writing .* needs about [\d.]+ KB "
         r"by the cost model.*STEGO_ARTIFACTS"),
    Case("full_disk_knn", "full disk", "kNN table", "ENOSPC while saving the table",
         "no table and no temporary file are left; the same one-line message",
         r"kNN table \(original\): the disk is full .*STEGO_ARTIFACTS"),
    Case("resume_note", "killed mid-write", "feature store", "rerun after an interruption",
         "says where it resumes", r"resuming the feature store .* at chunk 3 of 3"),
    Case("incomplete_store", "corrupt or mislabeled file", "feature store", "open a store without COMPLETE",
         "refused, with how many chunks are written and the command that finishes it",
         r"incomplete \(2 of 3 chunks written, no COMPLETE marker\)"),
    Case("store_version", "corrupt or mislabeled file", "feature store", "open a store of another format version",
         "refused: delete and rebuild", r"format version 0, expected 1"),
    Case("knn_wrong_length", "corrupt or mislabeled file", "kNN table", "a table with fewer rows than the store",
         "refused: rebuild it", r"kNN table of the wrong length"),
    Case("knn_out_of_range", "corrupt or mislabeled file", "kNN table", "a table pointing past the store's items",
         "refused: rebuild it", r"points outside the store"),
    Case("truncated_checkpoint", "corrupt or mislabeled file", "released checkpoint", "load half a .ckpt file",
         "refused as truncated", r"truncated"),
    Case("mislabeled_checkpoint", "corrupt or mislabeled file", "released checkpoint",
         "load a Potsdam checkpoint as CocoStuff", "refused, naming both datasets",
         r"expected_dataset.*potsdam.*cocostuff27"),
    Case("wrong_code_dim_checkpoint", "corrupt or mislabeled file", "released checkpoint",
         "load a 16-d checkpoint where 70 is expected", "refused, naming both dimensions", r"16.*70"),
    Case("unsafe_checkpoint", "unsafe checkpoint", "released checkpoint",
         "a checkpoint that pickles a class from outside the trusted families",
         "refused unless trusted=True (torch.load weights_only)", r"mylib\.evil\.Payload.*trusted=True"),
    Case("cuda_missing", "wrong device", "every stage", "device 'cuda' on a machine without CUDA",
         "refused at once", r"'cuda' is not available here"),
    Case("cuda_index", "wrong device", "every stage", "device 'cuda:7' on a machine without 8 GPUs",
         "refused at once", r"cuda:7.* (not available|does not exist)"),
    Case("device_typo", "wrong device", "every stage", "device 'gpu'", "refused, listing the valid devices",
         r"expected 'cpu', 'cuda', 'cuda:N' or 'mps'"),
)


def cases_table() -> pd.DataFrame:
    """The cases as the reliability page shows them (human column names, no index)."""
    df = pd.DataFrame([asdict(c) for c in CASES])
    df["fault"] = pd.Categorical(df["fault"], FAULTS, ordered=True)
    df = df.sort_values("fault", kind="stable")
    return df[["fault", "target", "action", "outcome"]].rename(columns={
        "fault": "Fault", "target": "Hits", "action": "What the test does", "outcome": "What happens"})
