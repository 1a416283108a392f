"""Reference models: plain PyTorch, single files, public checkpoint parameter names.

`build(name, **overrides)` builds a named configuration (overrides replace config fields);
`names()` lists them. Build under `with torch.device("meta"):` to get a model without
allocating its weights.

GPT-2 (`GPT2`, `GPT2Config`; vocab 50257, block 1024 unless noted):
    gpt2              12 layers, 12 heads, hidden 768   (124M)
    gpt2-medium       24 layers, 16 heads, hidden 1024  (350M)
    gpt2-large        36 layers, 20 heads, hidden 1280  (774M)
    gpt2-xl           48 layers, 25 heads, hidden 1600  (1.5B)
    megatron-1.2b     40 layers, 16 heads, hidden 1536  Megatron-LM weak-scaling configs:
    megatron-2.5b     54 layers, 20 heads, hidden 1920  vocab 51200 (50257 padded), block
    megatron-4.2b     64 layers, 24 heads, hidden 2304  1024, 96 features per head; run on
    megatron-8.3b     72 layers, 32 heads, hidden 3072  1, 2, 4 and 8 GPUs of TP in the paper
    gpt2-bytes        4 layers, 4 heads, hidden 128, vocab 256 (bytes), block 256:
                      `autotp train`'s default, small enough for a 2-core CPU
    gpt2-tiny         2 layers, 4 heads, hidden 32, vocab 101, block 32 (tests)
    gpt2-tiny-flash   gpt2-tiny with F.scaled_dot_product_attention

BERT for masked LM (`BertForMaskedLM`, `BertConfig`; vocab 30522, 512 positions unless noted):
    bert-base             12 layers, hidden 768, 12 heads, intermediate 3072   (post-LN)
    bert-large            24 layers, hidden 1024, 16 heads, intermediate 4096  (post-LN)
    megatron-bert-336m    24 layers, hidden 1024, 16 heads, intermediate 4096  (pre-LN)
    megatron-bert-1.3b    24 layers, hidden 2048, 32 heads, intermediate 8192  (pre-LN)
    megatron-bert-3.9b    48 layers, hidden 2560, 40 heads, intermediate 10240 (pre-LN)
    bert-tiny             2 layers, hidden 32, 4 heads, intermediate 64, vocab 97,
                          32 positions (tests, post-LN)
    bert-tiny-preln       bert-tiny with pre-LN

The megatron-bert-* sizes are the Megatron-LM paper's BERT models (its 336M, 1.3B and
3.9B); the paper used a 29056-token vocabulary, here it stays 30522.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from .bert import BertConfig, BertForMaskedLM
from .gpt2 import GPT2, GPT2Config

__all__ = [
    "CONFIGS",
    "BertConfig",
    "BertForMaskedLM",
    "GPT2",
    "GPT2Config",
    "UnknownModelError",
    "build",
    "names",
]


def _megatron_gpt(n_embd: int, n_head: int, n_layer: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=51200, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )


def _megatron_bert(hidden: int, heads: int, layers: int) -> BertConfig:
    return BertConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=4 * hidden,
        pre_ln=True,
    )


_GPT2_TINY = GPT2Config(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)
_BERT_TINY = BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
)

CONFIGS: dict[str, GPT2Config | BertConfig] = {
    # GPT-2, the public checkpoints' sizes
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    # Megatron-LM weak scaling (hidden, heads, layers)
    "megatron-1.2b": _megatron_gpt(1536, 16, 40),
    "megatron-2.5b": _megatron_gpt(1920, 20, 54),
    "megatron-4.2b": _megatron_gpt(2304, 24, 64),
    "megatron-8.3b": _megatron_gpt(3072, 32, 72),
    # tests
    "gpt2-bytes": GPT2Config(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "gpt2-tiny": _GPT2_TINY,
    "gpt2-tiny-flash": dataclasses.replace(_GPT2_TINY, flash=True),
    # BERT, post-LN as published
    "bert-base": BertConfig(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072
    ),
    "bert-large": BertConfig(
        num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096
    ),
    # Megatron-LM BERT, pre-LN (hidden, heads, layers)
    "megatron-bert-336m": _megatron_bert(1024, 16, 24),
    "megatron-bert-1.3b": _megatron_bert(2048, 32, 24),
    "megatron-bert-3.9b": _megatron_bert(2560, 40, 48),
    # tests
    "bert-tiny": _BERT_TINY,
    "bert-tiny-preln": dataclasses.replace(_BERT_TINY, pre_ln=True),
}


class UnknownModelError(KeyError, ValueError):
    """`build` was given a name that is not in `CONFIGS`."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def names() -> list[str]:
    """The names `build` accepts, in registry order."""
    return list(CONFIGS)


def build(name: str, **overrides: Any) -> nn.Module:
    """Build the named reference model; `overrides` replace fields of its config.

    >>> model = build("gpt2-tiny", dropout=0.1)
    """
    if name not in CONFIGS:
        raise UnknownModelError(
            f"unknown model name {name!r}; known names: {', '.join(names())}. "
            f"Register a new configuration in autotp.models.CONFIGS to add one."
        )
    base = CONFIGS[name]
    fields = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(
            f"build({name!r}): {type(base).__name__} has no field(s) {', '.join(unknown)}; "
            f"its fields are: {', '.join(fields)}."
        )
    config = dataclasses.replace(base, **overrides)
    if isinstance(config, GPT2Config):
        return GPT2(config)
    return BertForMaskedLM(config)
