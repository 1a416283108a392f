"""Run the structural fuzzer for a while: random models from autotp.testing.fuzz's grammar, each
simulated and compared with serial in float64; verdict counts per feature, and a shrunk
reproducer for every distinct failure.

    python bench/fuzz.py --minutes 3 --tp 2 4 --seed 0
    python bench/fuzz.py --minutes 3 --sp        # every case with sequence parallelism
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotp.testing.fuzz import ModelCase, Verdict, check_case, random_case, shrink  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seed", type=int, default=0, help="first case's seed (then +1, +2...)")
    ap.add_argument("--shrink", type=int, default=60, help="checks spent shrinking a failure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sp", action="store_true", help="plan with sequence_parallel=True")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tps = tuple(args.tp)
    deadline = time.perf_counter() + 60 * args.minutes
    per_feature: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    failures: dict[str, tuple[ModelCase, Verdict, int, int]] = {}  # signature -> case
    seed = args.seed
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        case = random_case(seed, tps)
        try:
            verdict = check_case(case, sequence_parallel=args.sp)
        except Exception as e:  # noqa: BLE001 - the serial model failed: a generator bug
            verdict = Verdict("generator-error", f"{type(e).__name__}: {e}")
        totals[verdict.kind] += 1
        for tag in case.features:
            per_feature[tag][verdict.kind] += 1
        if not verdict.ok:
            sig = verdict.signature()
            if sig in failures:
                failures[sig] = (*failures[sig][:3], failures[sig][3] + 1)
            else:
                failures[sig] = (case, verdict, seed, 1)
        seed += 1
    tried = seed - args.seed
    elapsed = time.perf_counter() - start
    print(f"{tried} structures in {elapsed:.0f} s (seeds {args.seed}..{seed - 1}, tp {tps})")
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in totals.most_common()))
    kinds = ["equal", "refused", "wrong", "crash"]
    print(f"\n{'feature':40s}" + "".join(f"{k:>9s}" for k in kinds))
    for tag in sorted(per_feature):
        row = per_feature[tag]
        print(f"{tag:40s}" + "".join(f"{row[k]:9d}" for k in kinds))
    print(f"\n{len(failures)} distinct failures (grouped by verdict signature)")
    for n, (sig, (case, verdict, s, count)) in enumerate(failures.items(), 1):

        def same(c: ModelCase, sig: str = sig) -> bool:
            try:
                return check_case(c, sequence_parallel=args.sp).signature() == sig
            except Exception:  # noqa: BLE001 - a generator failure is no reproduction
                return False

        small = shrink(case, same, tps, budget=args.shrink) if args.shrink else case
        # a shrunk case differs only where `same` ran it; else keep the first verdict (which
        # may be a generator error, that check_case would raise again)
        v = verdict if small.source == case.source else check_case(small, sequence_parallel=args.sp)
        print(f"\n{'=' * 100}\n[{n}] {sig}  ({count} cases, first seed {s})\n{v}\n")
        print(small.reproducer())


if __name__ == "__main__":
    main()
