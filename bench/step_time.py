"""Training-step time on gloo, same model, same run: autotp against PyTorch's DTensor tensor
parallel (hand-written Colwise/Rowwise plan), against Megatron-style TP written by hand
(plain tensors, one f per block input; bench/peers.py) and against the serial model.

Every rank builds all four from one serial model (the reference GPT-2, fused Q|K|V; or
with --model bert the reference BERT, separate Q, K and V) and runs them interleaved, in a rotating
order, one forward + backward each per round; a step's time is the slowest rank's, between
barriers. Medians of --steps rounds after --warmup. One thread per rank (so tp=4 shares
this machine's 2 cores between 4 ranks; only ratios from one run mean anything). Targets:
autotp within 3% of hand-written and faster than DTensor.

    python bench/step_time.py [--tps 2 4] [--steps 10] [--model bert --hidden 256]
"""

from __future__ import annotations

import argparse
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
import peers  # noqa: E402

METHODS = ("serial", "autotp", "DTensor", "by hand")


def _timed(module: torch.nn.Module, x: dict, run: bool, dtensor: bool) -> tuple[float, float]:
    dist.barrier()
    t = time.perf_counter()
    loss = peers.step(module, x, dtensor=dtensor).item() if run else float("nan")
    elapsed = torch.tensor([time.perf_counter() - t])
    dist.barrier()
    module.zero_grad(set_to_none=True)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step takes the slowest rank's time
    return elapsed.item(), loss


def _rank(rank: int, world: int, kind: str, sizes: comm.Sizes, warmup: int, steps: int):
    from torch.distributed.device_mesh import init_device_mesh

    model, x = comm.make(kind, sizes)
    vocab = autotp.VocabOptions(gather_outputs=False)  # the peers keep logits split too
    mesh = init_device_mesh("cpu", (world,))
    by_hand = peers.MegatronGPT2 if kind == "gpt2" else peers.MegatronBERT
    modules = {
        "serial": model,  # on rank 0; the others wait at the barrier
        "autotp": autotp.parallelize(model, world, x, vocab=vocab),
        "DTensor": peers.dtensor_model(kind, model, mesh),
        "by hand": by_hand(model, rank, world),
    }
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    losses: dict[str, float] = {}
    for i in range(warmup + steps):
        order = METHODS[i % 4 :] + METHODS[: i % 4]
        for m in order:
            run = m != "serial" or rank == 0
            t, loss = _timed(modules[m], x, run, dtensor=m == "DTensor")
            if i >= warmup:
                times[m].append(t)
            losses.setdefault(m, loss)
    return {m: statistics.median(v) for m, v in times.items()}, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tps", type=int, nargs="+", default=[2, 4])
    ap.add_argument(
        "--model",
        choices=["gpt2", "bert"],
        default="gpt2",
        help="bert: separate Q, K and V linears (post-LN, masked LM)",
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    sizes = comm.Sizes(layers=args.layers, hidden=args.hidden, heads=args.heads,
                       vocab=args.vocab, batch=args.batch, seq=args.seq)  # fmt: skip
    start = time.perf_counter()
    name = {"gpt2": "GPT-2 (fused Q|K|V)", "bert": "BERT (separate Q, K, V)"}[args.model]
    print(f"{name}, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocabulary "
          f"{args.vocab}, float32, batch {args.batch} x seq {args.seq}; forward + backward; "
          f"gloo, 1 thread per rank on {os.cpu_count()} cores; "
          f"medians of {args.steps} steps after {args.warmup}")  # fmt: skip
    print(f"{'tp':>2s} " + " ".join(f"{m + ' ms':>11s}" for m in METHODS)
          + f"  {'autotp/by hand':>14s} {'autotp/DTensor':>14s} {'serial/autotp':>13s}"
          + "  |loss - serial| autotp, DTensor, by hand")  # fmt: skip
    summary = []
    for tp in args.tps:
        ranks = run_on_gloo(_rank, tp, args.model, sizes, args.warmup, args.steps, timeout=600)
        med, losses = ranks[0]
        hand, dt = med["autotp"] / med["by hand"], med["autotp"] / med["DTensor"]
        speedup = med["serial"] / med["autotp"]
        diffs = [abs(losses[m] - losses["serial"]) for m in METHODS[1:]]
        print(f"{tp:2d} " + " ".join(f"{med[m] * 1e3:11.1f}" for m in METHODS)
              + f"  {hand:14.3f} {dt:14.3f} {speedup:13.2f}  "
              + ", ".join(f"{d:.1e}" for d in diffs))  # fmt: skip
        summary.append(f"tp={tp}: autotp/by hand {hand:.3f}, autotp/DTensor {dt:.3f}")
    print(f"in {time.perf_counter() - start:.0f} s: " + "; ".join(summary)
          + " (targets: <= 1.03 and < 1)")  # fmt: skip


if __name__ == "__main__":
    main()
