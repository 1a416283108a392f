"""Communication per training step, counted from what ran: autotp against Megatron's
optimum (Megatron-LM's 2 + 2 per layer) and against PyTorch's DTensor tensor parallel with a
hand-written Colwise/Rowwise plan, on the same models, on gloo ranks at tp 2, 4 and 8;
for the reference GPT-2 also against Megatron-style TP written by hand (bench/peers.py).

Models: the reference GPT-2 and BERT (masked LM) of autotp.models, and transformers'
GPT2LMHeadModel and BertForMaskedLM, all with 4 layers, hidden 256, 8 heads, vocabulary
1024, float32, batch 4 x seq 128. Every collective each rank dispatches during one forward
and backward is logged at the dispatcher (bench/peers.py, CollectiveCounter); bytes are
what one rank passes into the collectives.

Megatron's optimum per step, for L layers and a hidden state of B x T x H: forward
2L + 1 all-reduces of B x T x H (two per layer, the vocab-parallel embedding) and 3 of
B x T (the vocab-parallel cross-entropy: row max, target logit, sum of exponentials);
backward 2L + 1 of B x T x H (two per layer, the output layer's f).

    python bench/comm.py [--tps 2 4 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

import autotp
from autotp.models import build
from autotp.testing import run_on_gloo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

MODELS = ("gpt2", "bert", "hf-gpt2", "hf-bert-mlm")


@dataclasses.dataclass(frozen=True)
class Sizes:
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    vocab: int = 1024  # a multiple of 128 x 8: no vocabulary padding at tp <= 8
    batch: int = 4
    seq: int = 128


def make(kind: str, sizes: Sizes = Sizes()) -> tuple[torch.nn.Module, dict]:
    """The serial model `kind` and one batch for it, the same on every rank."""
    layers, hidden, heads, vocab, batch, seq = dataclasses.astuple(sizes)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if kind == "gpt2":
        model = build("gpt2", n_layer=layers, n_head=heads, n_embd=hidden, vocab_size=vocab,
                      block_size=seq)  # fmt: skip
        return model, {"idx": ids, "targets": ids.roll(-1, dims=1)}
    if kind == "bert":
        model = build("bert-base", num_hidden_layers=layers, num_attention_heads=heads,
                      hidden_size=hidden, intermediate_size=4 * hidden, vocab_size=vocab,
                      max_position_embeddings=seq)  # fmt: skip
        return model, {"input_ids": ids, "labels": ids}
    import transformers

    transformers.logging.set_verbosity_error()
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if kind == "hf-gpt2":
        cfg = transformers.GPT2Config(n_positions=seq, n_embd=hidden, n_layer=layers,
                                      n_head=heads, use_cache=False, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **common)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg), {"input_ids": ids, "labels": ids}
    if kind == "hf-bert-mlm":
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=4 * hidden,
                                      max_position_embeddings=seq, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, **common)  # fmt: skip
        return transformers.BertForMaskedLM(cfg), {"input_ids": ids, "labels": ids}
    raise ValueError(kind)


def optimum(kind: str, sizes: Sizes = Sizes(), itemsize: int = 4) -> dict[str, tuple[int, int]]:
    """Megatron's collectives per step: phase -> (count, bytes)."""
    n, b, t = sizes.layers, sizes.batch, sizes.seq
    big = b * t * sizes.hidden * itemsize
    # transformers' GPT-2 computes its loss in float32 (its shifted labels keep b x t rows,
    # the last of each ignored)
    rows = b * t * (4 if kind == "hf-gpt2" else itemsize)
    return {
        "forward": (2 * n + 1 + 3, (2 * n + 1) * big + 3 * rows),
        "backward": (2 * n + 1, (2 * n + 1) * big),
    }


def per_phase(log: list[peers.Collective]) -> dict[str, tuple[int, int]]:
    """phase -> (count, bytes), as `optimum` gives them."""
    return {
        phase: (sum(c.phase == phase for c in log), sum(c.nbytes for c in log if c.phase == phase))
        for phase in ("forward", "backward")
    }


def _rank(rank: int, world: int, kinds: tuple[str, ...]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for kind in kinds:
        model, x = make(kind)
        vocab = autotp.VocabOptions(gather_outputs=False)  # the peers keep logits split too
        methods = {
            "autotp": autotp.parallelize(model, world, x, vocab=vocab),
            "DTensor": peers.dtensor_model(kind, model, mesh),
        }
        if kind == "gpt2":  # the Megatron-LM way, written by hand (reference GPT-2 only)
            methods["by hand"] = peers.MegatronGPT2(model, rank, world)
        serial = peers.step(model, x).item()
        for name, module in methods.items():
            counter = peers.CollectiveCounter()
            with counter:
                loss = peers.step(module, x, dtensor=name == "DTensor").item()
            results[kind, name] = per_phase(counter.log) | {
                "ops": sorted({c.op for c in counter.log}),
                "loss": abs(loss - serial),
            }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    mib = 1 / 2**20
    z = Sizes()
    print(f"{z.layers} layers, hidden {z.hidden}, {z.heads} heads, vocabulary {z.vocab}, "
          f"float32, batch {z.batch} x seq {z.seq}; one training step; gloo")  # fmt: skip
    print(f"{'model':12s} {'tp':>2s} {'method':9s} {'fwd':>4s} {'bwd':>4s} {'fwd MiB':>8s} "
          f"{'bwd MiB':>8s} {'x optimum':>9s}  ops        |loss - serial|")  # fmt: skip
    extra: dict[str, list[str]] = {"autotp": [], "DTensor": []}
    for tp in args.tps:
        ranks = run_on_gloo(_rank, tp, tuple(args.models), timeout=600)
        for kind in args.models:
            best = optimum(kind)
            rows = [("optimum", best | {"ops": ["all_reduce"]}, None)]
            for name in ("autotp", "DTensor", "by hand"):
                if (kind, name) not in ranks[0]:
                    continue
                r = ranks[0][kind, name]
                if any(rk[kind, name] != r for rk in ranks[1:]):
                    r = r | {"ops": r["ops"] + ["(ranks differ)"]}
                rows.append((name, r, r["loss"]))
            total_best = best["forward"][1] + best["backward"][1]
            for name, r, diff in rows:
                (nf, bf), (nb, bb) = r["forward"], r["backward"]
                ratio = (bf + bb) / total_best
                optimal = (r["forward"], r["backward"]) == (best["forward"], best["backward"])
                if name in extra and not optimal:
                    extra[name].append(f"{kind} tp={tp}: {nf}+{nb} vs "
                                       f"{best['forward'][0]}+{best['backward'][0]}")  # fmt: skip
                print(f"{kind:12s} {tp:2d} {name:9s} {nf:4d} {nb:4d} {bf * mib:8.2f} "
                      f"{bb * mib:8.2f} {ratio:9.2f}  {','.join(r['ops']):10s} "
                      + ("" if diff is None else f"{diff:.1e}"))  # fmt: skip
    n = len(args.tps) * len(args.models)
    print(
        f"in {time.perf_counter() - start:.0f} s: autotp ran Megatron's optimum in "
        f"{n - len(extra['autotp'])}/{n} cases, DTensor in {n - len(extra['DTensor'])}/{n}"
        + (f"; DTensor more in {'; '.join(extra['DTensor'])}" if extra["DTensor"] else "")
        + (f"; autotp more in {'; '.join(extra['autotp'])}" if extra["autotp"] else "")
    )


if __name__ == "__main__":
    main()
