"""The options of a training run, and every check that can be made before a process starts.

`autotp train` runs `check(cfg)` in the launching process: a bad count, an unknown model,
data the model cannot read, a tp the model's heads do not divide, a checkpoint folder that
cannot be written or holds another run: each is one message, before torchrun starts any
worker. The workers run the same checks again (`torchrun -m autotp.run.train` by hand
skips the launcher).
"""

from __future__ import annotations

import argparse
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..common.errors import AutoTPError, UsageError

__all__ = [
    "TrainConfig",
    "config_from_args",
    "parser",
    "check_args",
    "check_model",
    "check_run_folder",
    "check",
]


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Batch sizes are global (all data-parallel ranks together)."""

    model: str = _opt(
        "gpt2-bytes",
        "a named model (autotp show --help lists them), hf:gpt2, hf:llama, hf:bert, "
        "or path/to/file.py:factory (runs that file)",
    )
    objective: str | None = _opt(
        None,
        "clm: next-token prediction (causal LM); mlm: BERT's masked LM, 15%% of positions "
        "chosen, the [MASK] id is the first id past the data's (256 for bytes). Default: "
        "chosen by the model, mlm for BERT-style models (bert-*, hf:bert, *ForMaskedLM), "
        "clm for the others",
        choices=("clm", "mlm"),
    )
    tp: int = _opt(2, "tensor-parallel ranks")
    dp: int = _opt(1, "data-parallel replicas (tp x dp processes in all)")
    sp: bool = _opt(
        False,
        "sequence parallelism: between the split blocks each tp rank holds 1/tp of the "
        "sequence (norms, dropout, residuals); --seq must be a multiple of --tp",
    )
    fsdp: bool = _opt(
        False,
        "shard parameters, gradients and optimizer state over the dp ranks (FSDP2's "
        "fully_shard on each TP shard); without it every dp rank holds whole TP shards",
    )
    data: str | None = _opt(
        None,
        "a text file or folder, or a uint16 token file X.bin "
        "(default: the Python standard library's source, as bytes)",
    )
    init_from: str | None = _opt(
        None,
        "start from saved weights: a .safetensors file, or a folder save_pretrained "
        "wrote (each rank reads only its own slices)",
    )
    steps: int = _opt(800, "optimizer steps to train to (a resumed run continues to it)")
    batch: int = _opt(16, "sequences per optimizer step, over all data-parallel ranks")
    seq: int = _opt(128, "tokens per sequence")
    accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = _opt(2e-3, "peak learning rate (AdamW)")
    min_lr: float = _opt(2e-4, "learning rate at the last step (cosine decay)")
    warmup: int = _opt(50, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    clip: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = _opt(0, "seeds the weights, the data order and dropout")
    dtype: str = _opt("float32", "parameter dtype", choices=("float32", "float64"))
    amp: str | None = _opt(None, "autocast on GPU", choices=("bf16", "fp16"))
    ckpt_dir: str | None = _opt(
        None, "the run folder: checkpoints, metrics.jsonl; a run already there is resumed"
    )
    save_every: int = _opt(0, "save every N steps (0: only at the end)")
    keep_last: int = _opt(0, "keep only the newest N checkpoints (0: keep all)")
    resume: bool = _opt(
        True, "continue from the run in --ckpt-dir (--no-resume refuses a folder that holds one)"
    )
    eval_batches: int = _opt(20, "validation batches at the end (0: none)")
    log_every: int = _opt(10, "a metrics row (and a plain line off a terminal) every N steps")
    progress: bool = _opt(True, "print progress on the lead rank")
    strict: bool = _opt(
        False, "refuse a matched block whose split cannot be proven (default: leave it replicated)"
    )
    allow_unsplit: bool = _opt(
        False, "accept a --tp that splits no MLP or attention block (only the vocabulary)"
    )


ERROR_FILE = "AUTOTP_ERROR_FILE"  # set by `autotp train`: where a worker leaves its error

# torchrun's own options, passed through by `autotp train`; the rest are TrainConfig's
TORCHRUN_FLAGS = (
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
    "--rdzv-conf",
    "--max-restarts",
    "--monitor-interval",
    "--master-addr",
    "--master-port",
    "--log-dir",
    "--redirects",
    "--tee",
)


class UsageParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are UsageErrors (one panel, exit 2), not argparse's
    usage text and exit."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message}", hint=f"{self.prog} --help lists every option")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""  # "(default: None)" says nothing; flags say both forms
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    ap = UsageParser(
        prog="autotp train",
        description="Train a model split over tp x dp processes (torchrun). With no "
        "options: the byte-level GPT-2 gpt2-bytes at tp=2 on the Python standard library.",
        epilog="torchrun's options pass through to it: "
        + ", ".join(TORCHRUN_FLAGS)
        + ", --standalone. Without --nproc-per-node autotp starts tp x dp processes.",
        formatter_class=_Help,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            ap.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_
            )
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        ap.add_argument(
            flag,
            type=kind,
            default=f.default,
            help=help_,
            choices=f.metadata.get("choices"),
            metavar=f.name.upper() if not f.metadata.get("choices") else None,
        )
    return ap


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from `autotp train`'s options; UsageError for what cannot parse."""
    return TrainConfig(**vars(parser().parse_args(argv)))


def check_args(cfg: TrainConfig) -> None:
    """Counts, rates and their relations, without touching a file or a model."""
    for name in ("tp", "dp", "steps", "batch", "seq", "accum", "log_every"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    for name in (
        "save_every",
        "keep_last",
        "eval_batches",
        "warmup",
        "clip",
        "min_lr",
        "weight_decay",
    ):
        if not getattr(cfg, name) >= 0:  # NaN fails too
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 0")
    if not 0 < cfg.lr < float("inf"):
        raise UsageError(f"--lr {cfg.lr}: must be a positive number")
    if cfg.batch % (cfg.dp * cfg.accum):
        raise UsageError(
            f"--batch {cfg.batch} is not divisible by --dp {cfg.dp} x --accum {cfg.accum}",
            hint="every data-parallel rank takes the same number of rows per micro-batch",
        )
    if cfg.amp and not torch.cuda.is_available():
        raise UsageError(
            f"--amp {cfg.amp} needs a GPU; this machine has none", hint="drop --amp on CPU"
        )


def check_model(model: torch.nn.Module, cfg: TrainConfig, vocab: int) -> str:
    """The model can train on this data at this sequence length, for the objective asked
    (or its own); returns that objective."""
    from .objective import check_objective, default_objective, model_vocab
    from .resolve import is_hf

    conf = getattr(model, "config", None)
    size = model_vocab(model)
    if isinstance(size, int) and size < vocab:
        raise UsageError(
            f"the data has {vocab} token ids but {cfg.model} has a vocabulary of {size}",
            hint="pick a model with a larger vocabulary, or other --data",
        )
    objective = cfg.objective or default_objective(model)
    check_objective(model, objective, vocab, cfg.model)
    if (
        objective == "clm"
        and not is_hf(model)
        and not callable(getattr(model, "example_inputs", None))
    ):
        raise UsageError(
            f"{cfg.model} is not a causal language model autotp train can drive",
            hint="train a GPT-2 configuration, hf:gpt2, hf:llama, or a factory whose "
            "model takes (idx, targets) and returns (logits, loss)",
        )
    longest = getattr(conf, "block_size", None) or getattr(conf, "max_position_embeddings", None)
    if isinstance(longest, int) and cfg.seq > longest:
        raise UsageError(
            f"--seq {cfg.seq} exceeds {cfg.model}'s {longest} positions",
            hint=f"--seq {longest} or less",
        )
    return objective


def check_run_folder(
    cfg: TrainConfig, say: Callable[[str], None]
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run in --ckpt-dir would resume from, as (folder, autotp.json), or
    None; raises when the folder cannot be written, or holds a run --no-resume would
    overwrite, or a run with no complete checkpoint."""
    import json

    from .checkpoint import Checkpoints, step_folders

    if cfg.ckpt_dir is None:
        return None
    folder = Path(cfg.ckpt_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".autotp-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"--ckpt-dir {folder} cannot be written: {e.strerror or e}",
            hint="choose a folder you can write to; it is checked before training starts",
        ) from e
    if not cfg.resume:
        if step_folders(folder) or (folder / "latest").exists():
            raise UsageError(
                f"--ckpt-dir {folder} holds a run and --no-resume would overwrite it",
                hint="drop --no-resume to continue it, or choose a new --ckpt-dir",
            )
        return None
    found = Checkpoints(folder, say=say).latest()
    if found is None:
        return None
    return found, json.loads((found / "autotp.json").read_text())


def check(cfg: TrainConfig, say: Callable[[str], None] = print) -> TrainConfig:
    """Every check that needs no process group, in the order of their cost; returns the
    config with the model's name canonical (a factory's file as an absolute path)."""
    check_args(cfg)  # before the imports below: a mistyped count is told at once
    from . import data as data_mod
    from .resolve import build, canonical, example_inputs

    cfg = dataclasses.replace(cfg, model=canonical(cfg.model))
    try:
        tokens = data_mod.load(cfg.data)
        train, _ = tokens.split(0.05)
    except (AutoTPError, ValueError, OSError) as e:
        raise UsageError(f"--data {cfg.data}: {e}") from e
    if len(train) < cfg.seq + 1:
        raise UsageError(
            f"--data {cfg.data}: {len(train)} training tokens, fewer than --seq {cfg.seq} + 1"
        )
    resume = check_run_folder(cfg, say)
    model = build(cfg.model, meta=True, seed=cfg.seed)
    cfg = dataclasses.replace(cfg, objective=check_model(model, cfg, tokens.vocab_size))
    if resume is not None:
        from .checkpoint import check_compatible, tied_names

        shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        check_compatible(resume[1], resume[0], cfg.model, shapes, tied_names(model),
                         objective=cfg.objective)  # fmt: skip
    from .rank_module import planned, split_blocks

    if cfg.sp and cfg.seq % cfg.tp:
        raise UsageError(
            f"--sp splits each sequence over the tp ranks: --seq {cfg.seq} is not a multiple "
            f"of --tp {cfg.tp}; choose --seq {cfg.seq - cfg.seq % cfg.tp or cfg.tp}, or drop --sp"
        )
    rows = max(cfg.batch // (cfg.dp * cfg.accum), 2)

    def blocks_split(tp: int) -> int:
        return split_blocks(planned(model, tp, example_inputs(model, rows, cfg.seq), cfg))

    if not blocks_split(cfg.tp) and cfg.tp > 1 and not cfg.allow_unsplit:
        works = [t for t in range(2, 9) if t != cfg.tp and _plans(blocks_split, t)]
        raise UsageError(
            f"--tp {cfg.tp} splits no MLP or attention block of {cfg.model}: its heads and "
            f"widths do not divide by {cfg.tp}, so {cfg.tp} processes would each compute the "
            "whole model but for the vocabulary",
            hint=(f"use --tp {' or '.join(map(str, works))}" if works else "use --tp 1")
            + ", or add --allow-unsplit to run it anyway",
        )
    return cfg


def _plans(blocks_split: Callable[[int], int], tp: int) -> bool:
    try:
        return blocks_split(tp) > 0
    except AutoTPError:
        return False
