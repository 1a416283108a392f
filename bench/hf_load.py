"""Loading a transformers checkpoint for tensor parallelism: autotp against transformers'
own TP, on the same `save_pretrained` folder, 2 gloo ranks, in one run.

    transformers: LlamaForCausalLM.from_pretrained(folder,
                      distributed_config=DistributedConfig(tp_size=2))
    autotp:       autotp.parallelize(<the model built on meta>, 2, weights=folder)

Each side runs in fresh processes. Per rank: the wall time of the load, the peak anonymous
resident memory while loading (RssAnon sampled every 2 ms, above what the process held
before: what the rank allocated, not the mapped file), the parameter bytes it holds, and
the time of its first calls (a prompt of 32 tokens into an empty cache, then one decoded
token), which include any planning. The largest rank's figure is shown; the last column
is autotp / transformers. autotp runs twice, in fresh processes: on an empty plan cache
(it traces every layer's program), then with the plans the first run stored (see
autotp.planning.cache: a plan is used only for the same program), as a second load of the
same model finds them. transformers' TP needs `accelerate` (pip install accelerate).

Each side runs --rounds times (alternating; each autotp round with a new, empty plan
cache), and the median of each figure is shown.

    python bench/hf_load.py [--size 300m|small] [--tp 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import anon_peak  # noqa: E402

from autotp.testing import run_on_gloo  # noqa: E402

SIZES = {  # a Llama of about 300M parameters (vocabulary 32,000), and a quick one
    "300m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip


def _config(size: str):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.LlamaConfig(max_position_embeddings=256, **SIZES[size])


def _load(rank: int, world: int, who: str, size: str, folder: str) -> dict:
    import transformers

    cfg = _config(size)
    with anon_peak() as peak:
        t0 = time.perf_counter()
        if who == "transformers":
            from transformers.distributed import DistributedConfig

            model = transformers.LlamaForCausalLM.from_pretrained(
                folder, distributed_config=DistributedConfig(tp_size=world)
            )
        else:
            import autotp

            with torch.device("meta"):
                meta = transformers.LlamaForCausalLM(cfg).eval()
            model = autotp.parallelize(meta, world, weights=folder)
        took = time.perf_counter() - t0
    local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters()]
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in local}.values())
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t1 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        t2 = time.perf_counter()
        token = out.logits[:, -1:].argmax(-1)
        key = "cache" if hasattr(out, "cache") else "past_key_values"  # transformers >= 5.25
        model(input_ids=token, use_cache=True, **{key: getattr(out, key)})
        t3 = time.perf_counter()
        model(input_ids=ids, use_cache=True)  # the same prompt again: planned
        t4 = time.perf_counter()
    return {"load": took, "peak": peak[0], "held": held, "prompt": t2 - t1,
            "decode": t3 - t2, "again": t4 - t3}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="300m")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import transformers

    cfg = _config(args.size)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        print(f"Llama {params / 1e6:.0f}M parameters (vocabulary {cfg.vocab_size}), float32, "
              f"save_pretrained; tp={args.tp}, gloo; the largest rank's figure, median of "
              f"{args.rounds} rounds")  # fmt: skip
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as plans:
                os.environ["AUTOTP_PLAN_CACHE"] = plans  # empty: the first run plans all
                for who in ("transformers", "autotp", "autotp, planned before"):
                    ranks = run_on_gloo(_load, args.tp, who, args.size, folder, timeout=1800)
                    worst = {k: max(r[k] for r in ranks) for k in ranks[0]}
                    runs.setdefault(who, []).append(worst)
        rows = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                for w, rs in runs.items()}  # fmt: skip
    names = {"load": "load wall time, s", "peak": "peak anonymous memory, MiB",
             "held": "parameter bytes per rank, MiB", "prompt": "first prompt call, s",
             "decode": "first decoded token, s", "again": "the prompt again, s"}  # fmt: skip
    scale = {"peak": 2**20, "held": 2**20}
    print(f"{'':32s} {'transformers':>13s} {'autotp':>10s} {'ratio':>6s} "
          f"{'autotp, planned before':>23s} {'ratio':>6s}")  # fmt: skip
    for key, label in names.items():
        a, b, c = (rows[w][key] for w in ("transformers", "autotp", "autotp, planned before"))
        s = scale.get(key, 1)
        print(f"{label:32s} {a / s:13.2f} {b / s:10.2f} {b / a:6.2f} {c / s:23.2f} {c / a:6.2f}")


if __name__ == "__main__":
    main()
