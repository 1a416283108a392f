"""What a run trains for: causal LM (`clm`, GPT-style) or BERT's masked LM (`mlm`).

    objective = default_objective(model)           # "mlm" for a *ForMaskedLM, else "clm"
    check_objective(model, "mlm", data_vocab=256, spec="bert-base")  # UsageError if it cannot
    x, labels = mlm_batch(train, step, 16, 128, seed=0, mask_id=256, vocab=256)

Masked LM as in BERT (Devlin et al., 2019): 15% of the positions are chosen; of those 80%
read the [MASK] id, 10% a random token id and 10% are left unchanged; the labels hold the
original id at the chosen positions and -100 (ignored by the loss) everywhere else. At
least one position of every sequence is chosen (the one with the smallest draw, when the
15% draw picks none), so no micro-batch has an empty loss.

The [MASK] id is the first id the data never holds: its vocabulary size (256 for byte-level
text), which the model's vocabulary must exceed (bert-base's and hf:bert's 30522 do). Random
replacements are drawn from the data's own ids.

The draws come from a generator of their own, seeded from (seed, step) alone and drawn for
the whole global batch, of which each data-parallel rank and micro-batch keeps its rows,
exactly as `data.batch` picks its windows: every rank of a TP group masks identically, a
resumed run masks as the uninterrupted one did, and a run at dp=2 masks the rows a serial
run masks. The global random state is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..common.errors import UsageError
from . import data as data_mod

__all__ = [
    "OBJECTIVES",
    "IGNORE",
    "MASK_FRACTION",
    "default_objective",
    "is_masked_lm",
    "model_vocab",
    "check_objective",
    "mask_tokens",
    "mlm_batch",
    "mlm_val_batch",
    "masked_perplexity",
]

OBJECTIVES = ("clm", "mlm")
IGNORE = -100  # the label of a position the loss skips (cross_entropy's ignore_index)
MASK_FRACTION = 0.15
_MLM_SALT = 0x4D4C4D  # "MLM": the masking stream is not the data order's stream
_VAL_SALT = 0x56414C  # "VAL": validation masks, fixed for the whole run


def is_masked_lm(model: torch.nn.Module) -> bool:
    """A BERT-style model: transformers' *ForMaskedLM classes and autotp.models' BERT."""
    return type(model).__name__.endswith("ForMaskedLM")


def default_objective(model: torch.nn.Module) -> str:
    """The objective a model is trained for when --objective is not given."""
    return "mlm" if is_masked_lm(model) else "clm"


def model_vocab(model: torch.nn.Module) -> int | None:
    """The model's vocabulary: its config's vocab_size, else its first embedding's rows."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return None if emb is None else emb.num_embeddings


def check_objective(model: torch.nn.Module, objective: str, data_vocab: int, spec: str) -> None:
    """UsageError unless `model` can be trained for `objective` on data of `data_vocab` ids."""
    from .resolve import is_hf

    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective}: must be one of {', '.join(OBJECTIVES)}")
    masked = is_masked_lm(model)
    if objective == "clm" and masked:
        raise UsageError(
            f"{spec} is a masked language model: it reads every position, so --objective clm "
            "would show it the tokens it is asked to predict",
            hint="drop --objective clm (mlm is its default), or train a GPT-style --model",
        )
    if objective == "mlm" and not (masked and is_hf(model)):
        raise UsageError(
            f"{spec} cannot be trained with --objective mlm: it is not a masked language model "
            "(it reads only earlier positions and takes no labels with [MASK] positions)",
            hint="drop --objective mlm to train it as a causal LM, or pass --model "
            "bert-base, hf:bert, or a factory returning a *ForMaskedLM",
        )
    if objective == "mlm":
        size = model_vocab(model)
        if size is not None and size <= data_vocab:
            raise UsageError(
                f"--objective mlm needs a [MASK] id the data does not use: the data's ids are "
                f"0..{data_vocab - 1} and {spec}'s vocabulary has {size}, so there is no id "
                f"{data_vocab} to mask with",
                hint=f"pick a --model whose vocabulary is larger than {data_vocab} "
                "(bert-base, hf:bert), or other --data",
            )


def mask_tokens(
    ids: torch.Tensor, generator: torch.Generator, *, mask_id: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of BERT's masking of `ids` [B, T], drawn from `generator`."""
    chosen_draw = torch.rand(ids.shape, generator=generator)  # (B, T)
    kind_draw = torch.rand(ids.shape, generator=generator)  # 80% mask, 10% random, 10% keep
    random_ids = torch.randint(0, vocab, ids.shape, generator=generator)
    chosen = chosen_draw < MASK_FRACTION
    first = chosen_draw.argmin(dim=-1, keepdim=True)  # every row scores at least one position
    chosen.scatter_(-1, first, True)
    masked = chosen & (kind_draw < 0.8)
    replaced = chosen & (kind_draw >= 0.8) & (kind_draw < 0.9)
    inputs = torch.where(masked, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(replaced, random_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def mlm_batch(
    data: data_mod.TokenData,
    step: int,
    global_batch: int,
    seq: int,
    *,
    seed: int,
    mask_id: int,
    vocab: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    micro: int = 0,
    micro_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's masked micro-batch of optimizer step `step`: int64 (inputs, labels) of
    [rows, seq], the windows `data.batch` gives (its x) masked by `mask_tokens` with the
    global batch's draws from (seed, step), this rank's rows kept."""
    x, _ = data_mod.batch(
        data, step, global_batch, seq, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
        micro=micro, micro_steps=micro_steps,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(data_mod._mix(seed ^ _MLM_SALT, step))
    rows = global_batch // (dp_size * micro_steps)
    start = (dp_rank * micro_steps + micro) * rows
    whole = torch.zeros(global_batch, seq, dtype=torch.long)  # the draws of every row
    whole[start : start + rows] = x
    inputs, labels = mask_tokens(whole, gen, mask_id=mask_id, vocab=vocab)
    return inputs[start : start + rows].contiguous(), labels[start : start + rows].contiguous()


def mlm_val_batch(
    x: torch.Tensor, index: int, *, seed: int, mask_id: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation batch `index` masked the same way every time (and on every rank): its
    masked-token perplexity compares across steps and runs of one seed."""
    gen = torch.Generator().manual_seed(data_mod._mix(seed ^ _VAL_SALT, index))
    return mask_tokens(x, gen, mask_id=mask_id, vocab=vocab)


@torch.no_grad()
def masked_perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    seq: int,
    *,
    seed: int,
    mask_id: int,
    vocab: int,
    batch_size: int = 16,
) -> tuple[float, int]:
    """(perplexity, tokens scored) of a masked LM over `tokens`: consecutive windows of
    `seq` ids, batch_size at a time, masked as validation masks them (`mlm_val_batch`),
    scored at the chosen positions only."""
    tokens = tokens.reshape(-1).long()
    windows = len(tokens) // seq
    if windows == 0:
        raise ValueError(f"{len(tokens)} tokens: fewer than one window of {seq}")
    total, count = 0.0, 0
    for i, first in enumerate(range(0, windows, batch_size)):
        rows = min(batch_size, windows - first)
        x = tokens[first * seq : (first + rows) * seq].view(rows, seq)
        x, y = mlm_val_batch(x, i, seed=seed, mask_id=mask_id, vocab=vocab)
        logits = logits_fn(x)  # (B, T, V)
        chosen = y != IGNORE
        nll = F.cross_entropy(logits[chosen].double(), y[chosen], reduction="sum")
        total += nll.item()
        count += int(chosen.sum())
    return math.exp(total / count), count
