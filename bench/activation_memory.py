"""Activation memory per rank, with and without sequence parallelism, on gloo ranks.

    python bench/activation_memory.py [--layers 4] [--hidden 768] [--heads 12] [--seq 512]

Builds the reference GPT-2 (dropout 0.1, flash attention, so the attention scores are not
stored) at tp 1, 2 and 4, parallelizes it with and without `sequence_parallel=True`, and
runs one training forward on each rank under `torch.autograd.graph.saved_tensors_hooks`,
summing the bytes of every distinct storage autograd keeps for backward that is not a
parameter: the activations (and dropout masks) a rank holds at the peak of a training
step. The largest rank is printed, in all and per layer (the difference between
--layers and half as many), the layer's against tp=1 next to what Korthikanti et al.
(2022) give per layer, sbh(10 + 24/t) without and sbh(34/t) with sequence parallelism
(bytes in 16-bit with 1-byte masks, so only their ratios compare: this runs in float32).
"""

from __future__ import annotations

import argparse
import time

import torch

from autotp.testing import run_on_gloo


def _rank(rank: int, world: int, cfg: dict, batch: int, seq: int, sp: bool) -> int:
    import autotp
    from autotp.models import build

    torch.manual_seed(0)
    model = build("gpt2", **cfg)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq))
    x = {"idx": idx, "targets": idx}
    module = autotp.parallelize(model, world, x, sequence_parallel=sp) if world > 1 else model
    module.train()
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = module(**x)
    loss.backward()
    return sum(saved.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    cfg = {
        "n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads,
        "vocab_size": 8192, "block_size": args.seq, "dropout": 0.1, "flash": True,
    }  # fmt: skip
    start = time.perf_counter()
    print(
        f"GPT-2 (reference), hidden {args.hidden}, {args.heads} heads, vocabulary 8192, batch "
        f"{args.batch} x seq {args.seq}, float32, dropout 0.1, flash attention; bytes autograd "
        "saves for backward on the largest rank, parameters excluded; per layer: the "
        f"difference between {args.layers} and {args.layers // 2} layers"
    )

    def measure(tp: int, sp: bool) -> tuple[float, float]:
        got = []
        for layers in (args.layers, args.layers // 2):
            c = {**cfg, "n_layer": layers}
            got.append(max(run_on_gloo(_rank, tp, c, args.batch, args.seq, sp, timeout=600)))
        return got[0], (got[0] - got[1]) / (args.layers - args.layers // 2)

    base, base_layer = measure(1, False)
    head = f"{'tp':>3} {'seq. parallel':>14} {'MiB total':>10} {'MiB a layer':>12}"
    print(f"{head} {'of tp=1':>8} {'paper':>6}")
    print(f"{1:>3} {'-':>14} {base / 2**20:>10.1f} {base_layer / 2**20:>12.2f} {1:>8.3f} {1:>6.3f}")
    for tp in (2, 4):
        for sp in (False, True):
            total, layer = measure(tp, sp)
            paper = (34 / tp if sp else 10 + 24 / tp) / 34
            print(
                f"{tp:>3} {'yes' if sp else 'no':>14} {total / 2**20:>10.1f} "
                f"{layer / 2**20:>12.2f} {layer / base_layer:>8.3f} {paper:>6.3f}"
            )
    print(f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
