"""Planning without the hardware: `plan()` and parallelize-on-meta (simulate's rank modules
on the meta device) for the paper's 1.2B, 2.5B, 4.2B and 8.3B configurations at tp 1, 2,
4 and 8: wall time and peak RSS, each in a fresh process so RSS is its own.
Target: 8.3B at tp=8 planned in under 1.5 s and under 1 GiB RSS. Then transformers' Llama
7B config (`hf:llama`) planned as `autotp.plan` plans a transformers model (its regions:
32 layers of one program, the embedding, the head) at tp 2 and 8; target under 3 s
(planned anew: the plan cache is off here).

    python bench/scale.py [--hf-only]
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
import autotp
from autotp.models import build
name, tp = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
with torch.device("meta"):
    model = build(name)
x = model.example_inputs(batch=1, seq=1024)
t1 = time.perf_counter()
try:
    plan = autotp.plan(model, tp, x)
except autotp.AutoTPError as e:
    print(json.dumps({"refused": str(e).splitlines()[0]}))
    sys.exit(0)
t2 = time.perf_counter()
sim = autotp.simulate(model, tp, x)
t3 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"build": t1 - t0, "plan": t2 - t1, "meta_ranks": t3 - t2, "rss_gib": rss,
                  "nodes": len(plan.graph.nodes)}))
"""


HF_CHILD = r"""
import json, os, resource, sys, time
os.environ["AUTOTP_PLAN_CACHE"] = "off"  # planning measured, not a stored plan read back
import torch
import autotp
from autotp.run.resolve import build
tp = int(sys.argv[1])
t0 = time.perf_counter()
model = build("hf:llama", meta=True)
t1 = time.perf_counter()
plan = autotp.plan(model, tp)
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"build": t1 - t0, "plan": t2 - t1, "rss_gib": rss,
                  "regions": len(plan.regions), "split": plan.split_fraction()}))
"""


def hf_rows() -> None:
    """transformers' Llama 7B config, planned by regions on the meta device."""
    print(f"{'hf:llama (7B)':15s} {'tp':>3s} {'regions':>8s} {'build':>7s} {'plan':>7s} "
          f"{'split':>7s} {'peak RSS':>9s}")  # fmt: skip
    for tp in (2, 8):
        out = subprocess.run([sys.executable, "-c", HF_CHILD, str(tp)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{'':15s} {tp:3d} {r['regions']:8d} {r['build']:6.2f}s {r['plan']:6.2f}s "
              f"{r['split']:7.1%} {r['rss_gib']:7.2f} GiB")  # fmt: skip
    print(
        f"7B Llama at tp=8: planned in {r['plan']:.2f} s: target (<3 s) "
        f"{'met' if r['plan'] < 3 else 'NOT met'}"
    )


def main() -> None:
    if "--hf-only" not in sys.argv:
        megatron_rows()
    hf_rows()


def megatron_rows() -> None:
    rows = []
    for name in ("megatron-1.2b", "megatron-2.5b", "megatron-4.2b", "megatron-8.3b"):
        for tp in (1, 2, 4, 8):
            out = subprocess.run([sys.executable, "-c", CHILD, name, str(tp)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            rows.append((name, tp, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"{'model':15s} {'tp':>3s} {'nodes':>6s} {'build':>7s} {'plan':>7s} "
          f"{'tp meta ranks':>14s} {'peak RSS':>9s}")  # fmt: skip
    for name, tp, r in rows:
        if "refused" in r:
            print(f"{name:15s} {tp:3d}  refused: {r['refused'][-60:]}")
            continue
        print(f"{name:15s} {tp:3d} {r['nodes']:6d} {r['build']:6.2f}s {r['plan']:6.2f}s "
              f"{r['meta_ranks']:13.2f}s {r['rss_gib']:7.2f} GiB")  # fmt: skip
    last = rows[-1][2]
    ok = last["plan"] < 1.5 and last["rss_gib"] < 1
    print(
        f"8.3B at tp=8: planned in {last['plan']:.2f} s with {last['rss_gib']:.2f} GiB peak "
        f"RSS: target (<1.5 s, <1 GiB) {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
