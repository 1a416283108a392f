"""Per-rank parameter bytes and per-step communication of a named model at a given tp,
counted from what ran on the meta device (no weights allocated).

    python bench/split_report.py gpt2 --tp 4 --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse

import torch

import autotp
from autotp.models import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="gpt2")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()

    with torch.device("meta"):
        model = build(args.model)
    x = model.example_inputs(batch=args.batch, seq=args.seq)
    sim = autotp.simulate(model, args.tp, x, vocab=autotp.VocabOptions(gather_outputs=False))
    plan = sim.plan
    splits = plan.splits
    elem = 4  # float32 bytes
    serial = {n: p for n, p in model.named_parameters()}  # tied weights counted once
    split_bytes = sum(p.numel() for n, p in serial.items() if n in splits) * elem
    repl_bytes = sum(p.numel() for n, p in serial.items() if n not in splits) * elem
    rank0 = sum(p.numel() for p in sim.ranks[0].parameters()) * elem
    with autotp.count_collectives() as log:
        _, loss = sim(**x)
        loss.backward()
    b, s = args.batch, args.seq
    vocab = model.config.vocab_size
    print(f"{args.model} at tp={args.tp}, batch {b} x seq {s}, float32")
    print(f"serial parameters:            {(split_bytes + repl_bytes) / 2**20:10.1f} MiB")
    print(f"  split {split_bytes / 2**20:.1f} MiB, replicated {repl_bytes / 2**20:.1f} MiB")
    print(f"rank 0 parameters:            {rank0 / 2**20:10.1f} MiB")
    ideal = split_bytes / args.tp + repl_bytes
    print(f"split/tp + replicated:        {ideal / 2**20:10.1f} MiB  (ratio {rank0 / ideal:.4f})")
    print("collectives per training step (per rank):")
    for kind in ("all_reduce", "all_reduce_max", "all_gather"):
        for d in ("forward", "backward"):
            n, mib = log.count(d, kind), log.elements(d, kind) * elem / 2**20
            if n:
                print(f"  {kind:15s} {d:9s} {n:4d} calls  {mib:9.2f} MiB")
    loss_elems = sum(e[2] for e in log.events if e[2] == b * s)
    print(
        f"the loss's all-reduces:       {loss_elems * elem / 2**10:10.1f} KiB"
        f"  ({log.count(None, 'all_reduce_max')} max + 2 sums of batch x seq numbers)"
    )
    gather = b * s * vocab * elem * (args.tp - 1) / args.tp
    print(
        f"gathering the logits instead: {gather / 2**20:10.1f} MiB per rank received"
        f"  (ratio {gather / (loss_elems * elem):.0f}x)"
    )


if __name__ == "__main__":
    main()
