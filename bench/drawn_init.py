"""What a rank holds while `autotp train` initialises a transformers model from the seed:
built whole (every rank holds the whole model for a moment) against drawn
(autotp.run.drawn: the large tensors recorded on the meta device, each rank drawing its
shards one tensor at a time), each in a fresh process. The drawn run also draws every
large tensor once and keeps half of its rows, as a rank of tp=2 does.

    python bench/drawn_init.py [--hidden 2048 --layers 16 --vocab 32000]

Prints wall time and peak RSS of each, and their ratios (drawn / whole).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch, transformers
transformers.logging.set_verbosity_error()
from autotp.run.drawn import Drawn
how, hidden, layers, vocab = sys.argv[1], *map(int, sys.argv[2:5])
cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
    intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
    num_attention_heads=hidden // 128, use_cache=False)
make = lambda: transformers.LlamaForCausalLM(cfg)
t0 = time.perf_counter()
if how == "drawn":
    drawn = Drawn.build(make, seed=0)
    model = drawn.model
    kept = []
    for n, _ in model.named_parameters():
        if n in drawn:
            whole = drawn.whole(n)
            kept.append(whole[: whole.shape[0] // 2].clone())
else:
    torch.manual_seed(0)
    model = make()
seconds = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": seconds, "rss_gib": rss, "params": params}))
"""


def _run(how: str, args: argparse.Namespace) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, how, str(args.hidden), str(args.layers), str(args.vocab)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    whole, drawn = _run("whole", args), _run("drawn", args)
    print(f"Llama, {whole['params'] / 1e9:.2f}B parameters (hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}), float32")  # fmt: skip
    print(f"{'':28}{'whole':>10}{'drawn':>10}{'ratio':>8}")
    for key, label in (("seconds", "build (+ draw, tp=2 rows) s"), ("rss_gib", "peak RSS GiB")):
        a, b = whole[key], drawn[key]
        print(f"{label:28}{a:10.2f}{b:10.2f}{b / a:8.2f}")


if __name__ == "__main__":
    main()
