"""Print the mutation score of the last ``make mutation`` run (mutmut's per-mutant results under ``mutants/``).

Killed = a test failed (or timed out) with the mutant in place. The score is killed / (all mutants that ran);
"no tests" mutants (a line no selected test runs) count as not killed. Survivors are listed by module and function
so that benchmarks/mutation.md can say why each is equivalent or harmless.

Usage: python benchmarks/mutation_score.py [--survivors] [--only NAMES_FILE]
       python benchmarks/mutation_score.py --sample N > names.txt   (a seeded sample of N mutants, stratified
       by module, for a quick estimate: mutmut run $(cat names.txt); then --only names.txt scores just those)
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

KILLED = {1, 3, 36, 24, -24, 152, 255, 37}  # failed, pytest error, timeouts, type check
SURVIVED = {0}
NO_TESTS = {5, 33}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--survivors", action="store_true", help="list every surviving mutant")
    ap.add_argument("--root", default="mutants", help="mutmut's working folder (default: mutants)")
    ap.add_argument("--sample", type=int, help="print a seeded sample of this many mutant names and stop")
    ap.add_argument("--only", help="score only the mutants named in this file (one per line)")
    args = ap.parse_args(argv)
    metas = sorted(Path(args.root).rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {args.root}/: run `make mutation` first", file=sys.stderr)
        return 1
    if args.sample:
        import random

        keys = sorted(k for meta in metas for k in json.loads(meta.read_text()).get("exit_code_by_key", {}))
        by_module = collections.defaultdict(list)
        for k in keys:
            by_module[k.split(".x")[0].split("__mutmut")[0].rsplit(".", 1)[0] if ".x" in k else k].append(k)
        rng = random.Random(0)
        picked = []
        for _module, group in sorted(by_module.items()):  # proportional to the module's share, at least one
            picked += rng.sample(group, max(1, round(args.sample * len(group) / len(keys))))
        print("\n".join(sorted(picked)))
        return 0
    only = set(Path(args.only).read_text().split()) if args.only else None
    per_module: dict[str, collections.Counter] = {}
    survivors: list[str] = []
    for meta in metas:
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        count = per_module.setdefault(meta.name.removesuffix(".py.meta"), collections.Counter())
        for key, code in codes.items():
            if only is not None and key not in only:
                continue
            if code is None:
                count["not run"] += 1
            elif code in KILLED:
                count["killed"] += 1
            elif code in SURVIVED:
                count["survived"] += 1
                survivors.append(key)
            elif code in NO_TESTS:
                count["no tests"] += 1
                survivors.append(key + "  (no tests)")
            else:
                count["other"] += 1
                survivors.append(f"{key}  (exit code {code})")
    total = collections.Counter()
    print(f"{'module':<14}{'mutants':>9}{'killed':>9}{'survived':>10}{'no tests':>10}{'score':>8}")
    for name, c in sorted(per_module.items()):
        ran = sum(c.values()) - c["not run"]
        total.update(c)
        score = 100 * c["killed"] / ran if ran else float("nan")
        print(f"{name:<14}{ran:>9}{c['killed']:>9}{c['survived']:>10}{c['no tests']:>10}{score:>7.1f}%")
    ran = sum(total.values()) - total["not run"]
    print(f"{'all':<14}{ran:>9}{total['killed']:>9}{total['survived']:>10}{total['no tests']:>10}"
          f"{100 * total['killed'] / max(ran, 1):>7.1f}%")
    if total["not run"]:
        print(f"({total['not run']} mutants not run: the run was interrupted)")
    if args.survivors:
        print("\nsurvivors (`mutmut show NAME` prints the diff):")
        print("\n".join(sorted(survivors)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
