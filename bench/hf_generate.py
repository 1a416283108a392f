"""generate() through autotp against the serial model, for every decoder-only architecture
of bench/hf_coverage.py (small configs, float64, a left-padded batch of two prompts):
greedy decoding, 5 new tokens, `autotp.simulate(model, tp)` in the region form with the
model's default cache (each rank's cache holding its own key/value heads).

    python bench/hf_generate.py [--tp 2 4] [--only llama gpt2 ...]

A row prints `equal` when the tokens are the serial model's, `DIFFER` with both when
not, `refused` with autotp's reason, or `crash`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_coverage as hc  # noqa: E402 - the same small configs

import autotp  # noqa: E402


def row(arch: str, tp: int) -> str:
    model, x, _ = hc.build(arch)
    model.config.use_cache = True
    model.generation_config.use_cache = True
    ids = x["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    try:
        sim = autotp.simulate(model, tp)
        want, got = model.generate(ids, **kw), sim.generate(ids, **kw)
    except autotp.AutoTPError as e:
        return "refused: " + str(e).splitlines()[0][:90]
    except Exception as e:  # noqa: BLE001 - a row, not the table
        return f"crash: {type(e).__name__}: {str(e)[:80]}"
    return "equal" if torch.equal(want, got) else f"DIFFER {want.tolist()} {got.tolist()}"


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    decoders = [a for a in hc.ARCHS if a not in (*hc.ENCODERS, *hc.SEQ2SEQ)
                and a not in ("clip_text_model", "vit", "whisper")]  # fmt: skip
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--only", nargs="+", choices=decoders, default=decoders)
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    verdicts = Counter()
    for arch in args.only:
        for tp in args.tp:
            v = row(arch, tp)
            verdicts[v.split(":")[0].split(" ")[0]] += 1
            print(f"{arch:14s} tp={tp}: {v}", flush=True)
    print("totals: " + ", ".join(f"{k} {n}" for k, n in sorted(verdicts.items())))


if __name__ == "__main__":
    main()
