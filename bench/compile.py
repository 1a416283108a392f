"""Training-step time of autotp's rank module, eager against torch.compile (inductor), on
gloo at tp 1 and 2, same model, same run.

Every rank builds two rank modules from one serial GPT-2, one run eagerly and one compiled
(fullgraph=True: the collectives are custom ops inside the graph), each with its own
AdamW (foreach, not compiled), and runs them interleaved, alternating which goes first, one
step each per round: forward, backward, optimizer step. A step's time is the slowest
rank's, between barriers; medians of --steps rounds after --warmup (the first compiled
step, timed apart, is the compile). One thread per rank, float32; only ratios from one run
mean anything. |loss diff| compares the two modules' first losses (same weights).

    python bench/compile.py [--tps 1 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import autotp
from autotp.testing import run_on_gloo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comm  # noqa: E402

METHODS = ("eager", "compiled")


def _step(module: torch.nn.Module, opt: torch.optim.Optimizer, x: dict) -> tuple[float, float]:
    """One training step; (slowest rank's seconds, loss)."""
    dist.barrier()
    t = time.perf_counter()
    _, loss = module(**x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    elapsed = torch.tensor([time.perf_counter() - t])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), loss.item()


def _rank(rank: int, world: int, sizes: comm.Sizes, warmup: int, steps: int, backend: str):
    model, x = comm.make("gpt2", sizes)
    vocab = autotp.VocabOptions(gather_outputs=False)
    eager = autotp.parallelize(model, world, x, vocab=vocab)
    parallel = autotp.parallelize(copy.deepcopy(model), world, x, vocab=vocab)
    modules = {"eager": eager, "compiled": torch.compile(parallel, backend=backend, fullgraph=True)}
    opts = {m: torch.optim.AdamW(modules[m].parameters(), lr=1e-4, foreach=True) for m in METHODS}
    compile_s, first_loss = _step(modules["compiled"], opts["compiled"], x)
    _, eager_loss = _step(modules["eager"], opts["eager"], x)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(warmup + steps):
        for m in METHODS[i % 2 :] + METHODS[: i % 2]:
            t, _ = _step(modules[m], opts[m], x)
            if i >= warmup:
                times[m].append(t)
    med = {m: statistics.median(v) for m, v in times.items()}
    return med, compile_s, abs(first_loss - eager_loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tps", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    sizes = comm.Sizes(layers=args.layers, hidden=args.hidden, heads=args.heads,
                       vocab=args.vocab, batch=args.batch, seq=args.seq)  # fmt: skip
    start = time.perf_counter()
    print(f"GPT-2, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocabulary "
          f"{args.vocab}, float32, batch {args.batch} x seq {args.seq}; forward + backward + "
          f"AdamW; torch.compile backend {args.backend}, fullgraph; gloo, 1 thread per rank "
          f"on {os.cpu_count()} cores; medians of {args.steps} steps after "
          f"{args.warmup}")  # fmt: skip
    print(f"{'tp':>2s} {'eager ms':>9s} {'compiled ms':>12s} {'eager/compiled':>14s} "
          f"{'compile s':>9s} {'|loss diff|':>11s}")  # fmt: skip
    summary = []
    for tp in args.tps:
        ranks = run_on_gloo(_rank, tp, sizes, args.warmup, args.steps, args.backend, timeout=1800)
        med, compile_s, diff = ranks[0]
        ratio = med["eager"] / med["compiled"]
        print(f"{tp:2d} {med['eager'] * 1e3:9.1f} {med['compiled'] * 1e3:12.1f} {ratio:14.2f} "
              f"{compile_s:9.1f} {diff:11.1e}")  # fmt: skip
        summary.append(f"tp={tp}: compiled {ratio:.2f}x eager")
    print(f"in {time.perf_counter() - start:.0f} s: " + "; ".join(summary))


if __name__ == "__main__":
    main()
