"""Single-GPU training throughput of GPT-2 through autotp (tp=1, bf16 autocast), as model
FLOPs utilisation, against the Megatron paper's single-GPU baseline (39 TFLOP/s, 30% of a
V100's peak). Runs only where a GPU is present. `--compile` runs the rank module through
torch.compile (inductor, fullgraph; the first steps, untimed, compile it).

    python bench/gpu_mfu.py [--model gpt2] [--batch 16] [--seq 1024] [--peak 989e12] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import autotp
from autotp.models import build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument(
        "--explicit-attention",
        action="store_true",
        help="the explicit softmax attention instead of F.scaled_dot_product_attention",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak", type=float, default=989e12, help="bf16 dense peak, FLOP/s")
    ap.add_argument("--compile", action="store_true", help="torch.compile the rank module")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU here: nothing measured")
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build(args.model, flash=not args.explicit_attention).to(dev)
    cfg = model.config
    x = model.example_inputs(batch=args.batch, seq=args.seq)
    module = autotp.parallelize(model, 1, x)  # the rewritten graph, tp=1: no communication
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    run = torch.compile(module, fullgraph=True) if args.compile else module

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = run(**x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.steps
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.seq
    # 6 N per token for the weights, plus attention's 12 L T C per token (fwd + bwd)
    flops = 6 * n_params * tokens + 12 * cfg.n_layer * args.seq * cfg.n_embd * tokens
    achieved = flops / dt
    print(f"{torch.cuda.get_device_name()}: {args.model} ({n_params / 1e6:.0f}M), "
          f"batch {args.batch} x seq {args.seq}, bf16 autocast, tp=1, "
          f"{'explicit' if args.explicit_attention else 'SDPA'} attention, "
          f"{'torch.compile' if args.compile else 'eager'}")  # fmt: skip
    print(
        f"step {dt * 1e3:.1f} ms, {tokens / dt:,.0f} tokens/s, "
        f"{achieved / 1e12:.1f} TFLOP/s = {achieved / args.peak:.1%} of {args.peak / 1e12:.0f}"
    )
    print(
        f"paper's single-GPU baseline: 39 TFLOP/s = 30% of a V100's peak; ratio of MFU "
        f"{(achieved / args.peak) / 0.30:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
