"""How far autotp gets on the Hugging Face architectures people train: for each one, a small
model built from its transformers config (random weights, float64) and each tp, one row:
the verdict, the share of parameters split, the largest difference to serial (outputs, loss,
gradients, one SGD step), the time `autotp.plan` took, the blocks matched and the blocks
left replicated, the front-end used, and whether transformers ships a tp_plan for it.
Then the totals per verdict, the details of every row that needs a look, and the sizes.

    python bench/hf_coverage.py [--tp 2 4] [--only gpt2 llama ...] [--markdown]
                                [--form regions|graph] [--sp]

--form regions (default): the plan `autotp.plan` and `parallelize` give a transformers
model (its regions: each repeated layer, the input embedding and the output head, the
model's own Python kept between them); the plan columns sum over the regions. --form
graph: the whole-graph form.

Verdicts: split (some parameter split, equal to serial), replicated (planned, nothing
split), refused (an AutoTPError), build failed (the model could not be built or run
serially: this script's problem), crash (any other exception from autotp: a bug), WRONG
(split but differs from serial: a bug).
"""

from __future__ import annotations

import argparse
import os
import re
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import autotp
from autotp.testing import assert_equivalent

ARCHS = (
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom", "falcon", "mistral", "mixtral",
    "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text",
    "stablelm", "olmo", "olmo2", "starcoder2", "llama", "cohere", "bert", "roberta",
    "distilbert", "albert", "electra", "xlm-roberta", "mpnet", "deberta-v2", "modernbert",
    "t5", "bart", "clip_text_model", "vit", "whisper",
)  # fmt: skip
ENCODERS = (
    "bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "mpnet", "deberta-v2",
    "modernbert",
)  # fmt: skip
SEQ2SEQ = ("t5", "bart")

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, POSITIONS = 32, 2, 4, 2, 64, 101, 64
EXPERTS, EXPERTS_PER_TOKEN = 4, 2
BATCH, SEQ = 2, 8
IMAGE, PATCH, MELS, AUDIO_POSITIONS = 32, 8, 16, 16  # whisper's input is 2 x its positions

DETAIL_LINES = 12  # of an error's text, after the table
EXACT = 1e-10  # float64 against float64: rounding only
RTOL_FLOAT32 = 1e-6  # where the model computes in float32 inside (in serial too)

# Config attribute names (as `to_dict` spells them) -> the small value, set where present.
SIZES: dict[tuple[str, ...], Any] = {
    ("hidden_size", "n_embd", "d_model", "dim"): HIDDEN,
    (
        "num_hidden_layers",
        "n_layer",
        "num_layers",
        "n_layers",
        "num_decoder_layers",
        "encoder_layers",
        "decoder_layers",
    ): LAYERS,  # fmt: skip
    (
        "num_attention_heads",
        "n_head",
        "num_heads",
        "n_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
    ): HEADS,  # fmt: skip
    ("num_key_value_heads", "num_kv_heads"): KV_HEADS,
    (
        "intermediate_size",
        "n_inner",
        "ffn_dim",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "d_ff",
        "ffn_hidden_size",
        "hidden_dim",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    ): FFN,  # fmt: skip
    ("head_dim", "d_kv"): HIDDEN // HEADS,
    ("vocab_size",): VOCAB,
    ("max_position_embeddings", "n_positions", "max_target_positions"): POSITIONS,
    ("num_experts", "num_local_experts"): EXPERTS,
    ("num_experts_per_tok",): EXPERTS_PER_TOKEN,
    # a separate embedding width (ALBERT, ELECTRA) or projection: keep it, smaller
    ("embedding_size",): HIDDEN // 2,
    ("word_embed_proj_dim", "pooler_hidden_size", "pooler_output_size", "projection_dim"): HIDDEN,
    ("use_cache",): False,
    # special tokens inside the small vocabulary (an embedding's padding_idx must fit)
    ("pad_token_id",): 0,
    ("bos_token_id", "cls_token_id"): 1,
    ("eos_token_id", "sep_token_id", "decoder_start_token_id", "forced_eos_token_id"): 2,
    ("begin_suppress_tokens",): None,
}

# Only where the generic shrink above cannot work.
OVERRIDES: dict[str, dict[str, Any]] = {
    # GPT-Neo lists its layers as [[kinds, repeats]]; the default is 24 layers
    "gpt_neo": {"attention_types": [[["global", "local"], LAYERS // 2]]},
    # GPT-J rotates the first rotary_dim (64) features of each head: fit it in a head of 8
    "gptj": {"rotary_dim": HIDDEN // HEADS // 2},
    # T5 starts its decoder with the pad token, which the config leaves to generation_config
    "t5": {"decoder_start_token_id": 0},
    # image and patch sizes of the small ViT
    "vit": {"image_size": IMAGE, "patch_size": PATCH, "num_channels": 3},
    # Whisper's mel bins and the encoder length its input must have (input: 2 x positions)
    "whisper": {"num_mel_bins": MELS, "max_source_positions": AUDIO_POSITIONS},
}


@dataclass
class Row:
    arch: str
    tp: int
    verdict: str = ""
    split_pct: float | None = None
    diff: float | None = None
    plan_s: float | None = None
    matched: int | None = None
    replicated: int | None = None
    unmatched: int | None = None  # linear layers no rule matched
    frontend: str = ""
    tp_plan: bool | None = None
    note: str = ""
    detail: str = ""  # the full error text, for rows that need a look


def small_config(arch: str) -> Any:
    """The architecture's default config, shrunk: every attribute SIZES names that the
    config has, every dropout probability 0, then the architecture's OVERRIDES."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(arch).to_dict()
    kwargs: dict[str, Any] = {}
    for names, value in SIZES.items():
        for name in names:
            if name in defaults and not (name.endswith("token_id") and defaults[name] is None):
                kwargs[name] = value
    for name, value in defaults.items():
        dropout = "dropout" in name or "pdrop" in name or "layerdrop" in name
        if (dropout or name.endswith("_prob")) and isinstance(value, float):
            kwargs[name] = 0.0
    if "num_experts" in defaults or "num_local_experts" in defaults:
        # the default grouped_mm experts kernel has no float64 version, and the eager one
        # loops over the experts hit (data-dependent, so not traceable): batched_mm
        kwargs["experts_implementation"] = "batched_mm"
    kwargs.update(OVERRIDES.get(arch, {}))
    return AutoConfig.for_model(arch, **kwargs)


def build(arch: str) -> tuple[nn.Module, dict[str, torch.Tensor], Any]:
    """The model people use for this architecture, in float64, and its example inputs."""
    import transformers as tf

    cfg = small_config(arch)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, SEQ // 2 :] = 0  # one padded row: masking must survive the split too
    x: dict[str, torch.Tensor]
    if arch in ENCODERS:
        model = tf.AutoModelForMaskedLM.from_config(cfg)
        labels = ids.clone()
        labels[:, ::2] = -100
        x = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    elif arch in SEQ2SEQ:
        model = tf.AutoModelForSeq2SeqLM.from_config(cfg)
        x = {"input_ids": ids, "attention_mask": mask, "labels": ids.flip(1)}
    elif arch == "clip_text_model":
        model = tf.CLIPTextModel(cfg)
        x = {"input_ids": ids, "attention_mask": mask}
    elif arch == "vit":
        model = tf.ViTModel(cfg)
        x = {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)}
    elif arch == "whisper":
        model = tf.WhisperModel(cfg)
        feats = torch.randn(BATCH, MELS, 2 * AUDIO_POSITIONS, generator=g)
        x = {"input_features": feats, "decoder_input_ids": ids}
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
        x = {"input_ids": ids, "labels": ids}
    model = model.double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    return model, x, cfg


def split_fraction(plan: autotp.Plan | autotp.RegionPlan, model: nn.Module) -> float:
    """Numel of the split parameters over all parameters (tied ones counted once), in %."""
    total = sum(p.numel() for p in model.parameters())
    if isinstance(plan, autotp.RegionPlan):
        params = dict(model.named_parameters(remove_duplicate=False))
        split = {id(params[n]): params[n].numel() for n in plan.splits if n in params}
        return 100.0 * sum(split.values()) / total
    gm = plan.traced.gm
    split = {id(p): p.numel() for p in (gm.get_parameter(n) for n in plan.propagation.params)}
    return 100.0 * sum(split.values()) / total


def _plans(plan: autotp.Plan | autotp.RegionPlan) -> list[autotp.Plan]:
    """The graph plans a plan is made of: its own, or each region's."""
    if isinstance(plan, autotp.RegionPlan):
        return [r.plan for r in plan.regions]
    return [plan]


def computes_float32(plan: autotp.Plan | autotp.RegionPlan) -> bool:
    """Whether any value in the traced float64 model is float32 (an upcast inside HF)."""
    for p in _plans(plan):
        for node in p.traced.gm.graph.nodes:
            for v in tree_flatten(node.meta.get("val"))[0]:
                if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
                    return True
    return False


def shorten(text: str, n: int = 90) -> str:
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "?"
    return line if len(line) <= n else line[: n - 3] + "..."


def failure(e: Exception) -> tuple[str, str]:
    """The verdict and the full text for an exception autotp raised. `plan` turns any other
    exception into an AutoTPError that says it is a bug in autotp: that is a crash too."""
    if isinstance(e, autotp.AutoTPError) and "this is a bug in autotp" in str(e):
        return f"crash: {type(e.__cause__ or e).__name__}", str(e)
    if isinstance(e, autotp.AutoTPError):
        return f"refused: {shorten(str(e), 70)}", str(e)
    return f"crash: {type(e).__name__}", traceback.format_exc(limit=-4)


def run_row(arch: str, tp: int, form: str = "graph", sp: bool = False) -> Row:
    row = Row(arch, tp)
    try:
        model, x, cfg = build(arch)
        with torch.no_grad():
            model(**x)  # the serial model must run before autotp is asked anything
    except Exception as e:  # noqa: BLE001 - a row, not the table
        row.verdict = f"build failed: {type(e).__name__}: {shorten(str(e), 60)}"
        row.detail = traceback.format_exc(limit=-3)
        return row
    row.tp_plan = bool(getattr(cfg, "base_model_tp_plan", None))
    try:
        t = time.perf_counter()
        plan = autotp.plan(model, tp, x, form=form, sequence_parallel=sp)
        row.plan_s = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - a row, not the table
        row.verdict, row.detail = failure(e)
        return row
    plans = _plans(plan)
    row.frontend = ",".join(sorted({p.traced.frontend for p in plans}))
    row.matched = sum(len(p.matches) for p in plans)
    row.replicated = sum(len(p.replicated) for p in plans)
    row.unmatched = sum(len(p.unmatched) for p in plans)
    row.split_pct = split_fraction(plan, model)
    f32 = computes_float32(plan)

    def parallel(m: nn.Module, t: int, xs: Any) -> nn.Module:
        return autotp.simulate(m, plan)

    try:
        report = assert_equivalent(model, x, tp, atol=1.0, parallel=parallel)  # report only
    except AssertionError as e:  # beyond atol=1: wrong by a lot
        row.diff = float("inf")
        row.verdict, row.detail = "WRONG: > 1", str(e)
        return row
    except Exception as e:  # noqa: BLE001
        row.verdict, row.detail = failure(e)
        return row
    keys = [k for k in report.diffs if k.split(":")[0] in ("output", "loss", "grad", "step")]
    row.diff = max((report.diffs[k] for k in keys), default=0.0)
    exact = all(report.diffs[k] <= EXACT for k in keys)
    close = all(report.diffs[k] <= EXACT + RTOL_FLOAT32 * report.scales[k] for k in keys)
    if exact or (close and f32):
        row.verdict = "split" if row.split_pct > 0 else "replicated"
        row.note = "" if exact else "float32 inside: rtol 1e-6"
    else:
        row.verdict = f"WRONG: {row.diff:.2g}"
        worst = ", ".join(f"{k} {v:.3g}" for k, v in report.worst(5))
        row.detail = f"largest differences: {worst}" + (" (float32 inside)" if f32 else "")
    replicated = [why for p in plans for _, why in p.replicated]
    if not row.verdict.startswith("WRONG") and replicated:
        row.detail = "\n".join("left replicated: " + why for why in replicated)
    return row


# (header, alignment) in the order of `cells`
COLUMNS = (
    ("architecture", "<"), ("tp", ">"), ("verdict", "<"), ("split", ">"), ("vs serial", ">"),
    ("plan", ">"), ("matched", ">"), ("repl", ">"), ("unmatched", ">"), ("front-end", "<"),
    ("HF tp_plan", "<"),
)  # fmt: skip


def cells(r: Row) -> list[str]:
    def num(v: float | None, fmt: str, unit: str = "") -> str:
        return "-" if v is None else format(v, fmt) + unit

    verdict = r.verdict + (" *" if r.note else "")
    tp_plan = "-" if r.tp_plan is None else ("yes" if r.tp_plan else "no")
    return [
        r.arch, str(r.tp), verdict, num(r.split_pct, ".1f", "%"), num(r.diff, ".2g"),
        num(r.plan_s, ".1f", " s"), num(r.matched, "d"), num(r.replicated, "d"),
        num(r.unmatched, "d"), r.frontend or "-", tp_plan,
    ]  # fmt: skip


def print_table(rows: list[Row], markdown: bool) -> None:
    heads = [h for h, _ in COLUMNS]
    table = [cells(r) for r in rows]
    if markdown:
        print("| " + " | ".join(heads) + " |")
        print("|" + "|".join("---" if a == "<" else "--:" for _, a in COLUMNS) + "|")
        for c in table:
            print("| " + " | ".join(s.replace("|", "\\|") for s in c) + " |")
        return
    # the verdict last, so that a long refusal does not push the other columns around
    order = [i for i, (h, _) in enumerate(COLUMNS) if h != "verdict"] + [heads.index("verdict")]
    for c in [heads, *table]:
        width = {i: max(len(t[i]) for t in [heads, *table]) for i in order}
        parts = [format(c[i], COLUMNS[i][1] + str(width[i])) for i in order]
        print("  ".join(parts).rstrip())


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=ARCHS, default=list(ARCHS))
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--form", choices=("regions", "graph"), default="regions")
    ap.add_argument("--sp", action="store_true", help="plan with sequence_parallel=True")
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    rows = []
    for arch in args.only:
        for tp in args.tp:
            rows.append(run_row(arch, tp, args.form, args.sp))
            print(f"  {arch} tp={tp}: {rows[-1].verdict}", flush=True)
    print()
    print_table(rows, args.markdown)
    print()
    totals = Counter(r.verdict.split(":")[0] for r in rows)
    print("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    for r in rows:
        look = r.verdict.split(":")[0] in ("crash", "WRONG", "build failed", "refused")
        if r.detail and (look or r.replicated):
            lines = re.sub(r"\S*/site-packages/", "", r.detail).strip().splitlines()
            lines = lines[:DETAIL_LINES] + (["..."] if len(lines) > DETAIL_LINES else [])
            print(f"\n{r.arch} tp={r.tp}: {r.verdict}\n  " + "\n  ".join(lines))
    print(
        f"\nsizes: hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads of {HIDDEN // HEADS} "
        f"({KV_HEADS} KV heads where the config has them: fewer than tp=4), FFN {FFN}, "
        f"vocab {VOCAB}, "
        f"{POSITIONS} positions, MoE {EXPERTS} experts / {EXPERTS_PER_TOKEN} per token; "
        f"inputs {BATCH} x {SEQ} tokens (row 0 half padded for encoders), ViT {IMAGE}px / "
        f"{PATCH}px patches, Whisper {MELS} mel bins x {2 * AUDIO_POSITIONS} frames; float64, "
        "dropout 0. split: <= 1e-10 from serial; * = float32 inside the model, within rtol 1e-6."
    )


if __name__ == "__main__":
    main()
