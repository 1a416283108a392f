"""Tokens per second of `autotp generate`'s decoding at a short and a long context: a
transformers GPT-2 (byte vocabulary, 2,048 positions) split by autotp over 2 gloo ranks,
continuing a prompt of 64 and of 1,024 bytes, with the KV cache (what `autotp generate`
does for a transformers model) and over the whole window (what it does without one).
With the cache a token costs the same at either context; without, it grows with it.

    python bench/generate_cache.py [--tp 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from autotp.testing import run_on_gloo


def _model():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=8, n_positions=2048,
                                  vocab_size=256, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _rates(rank: int, world: int, tokens: int) -> dict:
    import autotp
    from autotp.run.generate import CachedLogits, sample

    module = autotp.parallelize(_model(), world)

    def whole(ids: torch.Tensor) -> torch.Tensor:
        return module(input_ids=ids).logits

    out = {}
    g = torch.Generator().manual_seed(1)
    for context in (64, 1024):
        prompt = torch.randint(0, 256, (context,), generator=g).tolist()
        for name, fn in (("cache", CachedLogits(module)), ("whole window", whole)):
            with torch.no_grad():
                sample(fn, prompt, tokens=2, temperature=0, context=2048)  # planned
                if name == "cache":
                    fn = CachedLogits(module)
                t = time.perf_counter()
                sample(fn, prompt, tokens=tokens, temperature=0, context=2048)
                took = time.perf_counter() - t
            out[(name, context)] = tokens / took
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    rates = run_on_gloo(_rates, args.tp, args.tokens, timeout=1800)[0]
    print(f"GPT-2 (hidden 256, 4 layers, byte vocabulary), tp={args.tp}, gloo; "
          f"{args.tokens} greedy tokens after the prompt, planning aside")  # fmt: skip
    print(f"{'':14s} {'64 context':>12s} {'1024 context':>13s} {'1024 / 64':>10s}")
    for name in ("cache", "whole window"):
        a, b = rates[(name, 64)], rates[(name, 1024)]
        print(f"{name:14s} {a:9.1f} t/s {b:10.1f} t/s {b / a:10.2f}")


if __name__ == "__main__":
    main()
