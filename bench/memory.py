"""Memory per rank: GPT-2 medium materialised by the runner (meta, then one parameter at a
time) at tp 1, 2 and 4 on gloo: parameter bytes and peak RSS of each rank, against serial.

    python bench/memory.py [--model gpt2-medium]
"""

from __future__ import annotations

import argparse
import resource

import torch

from autotp.run.train import TrainConfig, Trainer
from autotp.testing import run_on_gloo


def _rank(rank: int, world: int, model: str) -> tuple[int, float]:
    cfg = TrainConfig(model=model, tp=world, dp=1, steps=0, batch=2, seq=64, progress=False,
                      data=None)  # fmt: skip
    trainer = Trainer(cfg)
    held = sum(p.numel() * p.element_size() for p in dict.fromkeys(trainer.module.parameters()))
    return held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-medium")
    args = ap.parse_args()
    from autotp.models import build

    with torch.device("meta"):
        serial = sum(p.numel() * 4 for p in build(args.model).parameters())
    print(f"{args.model}: serial parameters {serial / 2**30:.2f} GiB (float32)")
    print(f"{'tp':>3s} {'params per rank':>16s} {'of serial':>10s} {'peak RSS per rank':>18s}")
    for tp in (1, 2, 4):
        rows = run_on_gloo(_rank, tp, args.model, timeout=600)
        held = max(r[0] for r in rows)
        rss = max(r[1] for r in rows)
        print(f"{tp:3d} {held / 2**30:13.2f} GiB {held / serial:10.3f} {rss:15.2f} GiB")


if __name__ == "__main__":
    main()
