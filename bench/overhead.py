"""The cost of the rewrite itself: the tp=1 rewritten graph against the original model,
forward + backward, interleaved in one run, medians of 15 steps after warm-up.
Target: ratio at most 1.02.

    python bench/overhead.py [--model gpt2] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import autotp
from autotp.models import build


def _step(module, x) -> float:
    t = time.perf_counter()
    _, loss = module(**x)
    loss.backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.model)
    x = model.example_inputs(batch=args.batch, seq=args.seq)
    rewritten = autotp.parallelize(model, 1, x)
    serial, ours = [], []
    for i in range(args.steps + 3):
        a, b = (_step(model, x), _step(rewritten, x)) if i % 2 else (
            _step(rewritten, x), _step(model, x))[::-1]  # fmt: skip
        if i >= 3:
            serial.append(a)
            ours.append(b)
    s, o = statistics.median(serial), statistics.median(ours)
    print(f"{args.model}, batch {args.batch} x seq {args.seq}, forward+backward, CPU "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(
        f"original {s * 1e3:.1f} ms, autotp tp=1 {o * 1e3:.1f} ms: ratio {o / s:.3f} "
        f"(target <= 1.02)"
    )


if __name__ == "__main__":
    main()
