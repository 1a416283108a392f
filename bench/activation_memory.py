"""Activation memory per rank, with and without sequence parallelism, on gloo ranks.

    python bench/activation_memory.py [--layers 4] [--hidden 768] [--heads 12] [--seq 512]
                                      [--hf]

--hf: transformers' GPT2LMHeadModel of the same sizes instead (residual and embedding
dropout 0.1, sdpa attention without dropout), as autotp.parallelize gives it: by layers,
its own Python between them, and with sequence parallelism each layer handing its hidden
state to the next split along the sequence.

Builds the reference GPT-2 (dropout 0.1, flash attention, so the attention scores are not
stored) at tp 1, 2 and 4, parallelizes it with and without `sequence_parallel=True`, and
runs one training forward on each rank under `torch.autograd.graph.saved_tensors_hooks`,
summing the bytes of every distinct storage autograd keeps for backward that is not a
parameter: the activations (and dropout masks) a rank holds at the peak of a training
step. With sequence parallelism a rank keeps only its part of the sequence the
column-split linears read, and gathers it again in backward, as Megatron-LM does; that
part is what is counted. The largest rank is printed, in all and per layer (the difference between
--layers and half as many), the layer's against tp=1 next to what Korthikanti et al.
(2022) give per layer, sbh(10 + 24/t) without and sbh(34/t) with sequence parallelism
(bytes in 16-bit with 1-byte masks, so only their ratios compare: this runs in float32).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from autotp.testing import run_on_gloo


def _model(cfg: dict, hf: bool) -> torch.nn.Module:
    if not hf:
        from autotp.models import build

        return build("gpt2", **cfg)
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"], resid_pdrop=0.1,
        embd_pdrop=0.1, attn_pdrop=0.0, use_cache=False,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _rank(rank: int, world: int, cfg: dict, batch: int, seq: int, sp: bool, hf: bool) -> int:
    import autotp
    import autotp.runtime.collectives as C

    torch.manual_seed(0)
    model = _model(cfg, hf)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq))
    x = {"input_ids": idx, "labels": idx} if hf else {"idx": idx, "targets": idx}
    module = model
    if world > 1:
        form = {"form": "regions"} if hf else {}  # (the default for a transformers model)
        module = autotp.parallelize(model, world, None if hf else x, sequence_parallel=sp, **form)
    module.train()
    if hf:  # the first call plans the layers' patterns: not the one measured
        module(**x).loss.backward()
        module.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}
    keep = C._pack  # with sequence parallelism the rank module saves through this itself

    def pack(t: torch.Tensor) -> object:
        kept = keep(t)  # a tensor, or the rank's part of an all-gathered sequence
        s = (kept[0].part if isinstance(kept, tuple) else kept).untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return kept

    C._pack = pack  # counts inside the rank module's own saved-tensor hooks
    own = (hf and sp and world > 1) or any(isinstance(m, C.GatherFromSP) for m in module.modules())
    with (
        contextlib.nullcontext()
        if own
        else torch.autograd.graph.saved_tensors_hooks(pack, C._unpack)
    ):
        out = module(**x)
    loss = out.loss if hf else out[1]
    loss.backward()
    return sum(saved.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hf", action="store_true", help="transformers' GPT-2, by layers")
    args = ap.parse_args()
    cfg = {
        "n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads,
        "vocab_size": 8192, "block_size": args.seq, "dropout": 0.1, "flash": True,
    }  # fmt: skip
    start = time.perf_counter()
    which = "transformers' GPT2LMHeadModel, by layers" if args.hf else "GPT-2 (reference)"
    print(
        f"{which}, hidden {args.hidden}, {args.heads} heads, vocabulary 8192, batch "
        f"{args.batch} x seq {args.seq}, float32, dropout 0.1, "
        f"{'sdpa' if args.hf else 'flash'} attention; bytes autograd "
        "saves for backward on the largest rank, parameters excluded; per layer: the "
        f"difference between {args.layers} and {args.layers // 2} layers"
    )

    def measure(tp: int, sp: bool) -> tuple[float, float]:
        got = []
        for layers in (args.layers, args.layers // 2):
            c = {**cfg, "n_layer": layers}
            got.append(max(run_on_gloo(_rank, tp, c, args.batch, args.seq, sp, args.hf,
                                       timeout=600)))  # fmt: skip
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
