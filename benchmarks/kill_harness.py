"""Kill every stage at random moments (SIGKILL), restart it, and count what was corrupt, lost or recomputed.

    python benchmarks/kill_harness.py [--trials 20] [--seed 0] [--stages features knn ...] [--json out.json]

Prints one row per stage: trials, killed (before finishing by itself), corrupt (an artifact read half-written or
stale after the kill), lost (the restart failed or ended differently from an uninterrupted run), recomputed (the
restart completed an unfinished artifact), and the uninterrupted run's seconds. See ``tests/faults.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from faults import STAGES, Zygote, run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="kill-and-restart trials per stage (20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--json", help="also write the counts to this JSON file")
    args = ap.parse_args(argv)
    rows, t0 = [], time.perf_counter()
    zygote = Zygote()
    try:
        with tempfile.TemporaryDirectory(prefix="stego-kill-") as tmp:
            for i, name in enumerate(args.stages):
                work = Path(tmp) / name
                work.mkdir()
                rows.append(run_stage(zygote, STAGES[name], work, args.seed + i, args.trials,
                                      log=lambda msg: print(msg, file=sys.stderr, flush=True)))
    finally:
        zygote.close()
    cols = ("stage", "trials", "killed", "corrupt", "lost", "recomputed", "run_s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    for row in rows:
        for problem in row["problems"]:
            print(f"{row['stage']}: {problem}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(r["corrupt"] or r["lost"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
