"""GPT-2 in one file, nanoGPT style, with the public checkpoint's parameter names.

Plain PyTorch, no parallel awareness: this is the serial model that autotp traces and
splits. The forward is written to pass `torch.fx` symbolic tracing (with a tracer that
proxies buffers): no Python control flow on tensor values, no asserts on sizes, no
`torch.finfo`.

    x = wte(idx) + wpe(pos)                       # (B, T, C)
    for each block:
        x = x + attn(ln_1(x))                     # c_attn -> split Q|K|V -> heads -> c_proj
        x = x + mlp(ln_2(x))                      # c_fc -> gelu(tanh) -> c_proj
    logits = lm_head(ln_f(x))                     # (B, T, vocab), lm_head tied to wte

Parameter names follow the GPT-2 checkpoint as nanoGPT loads it (`transformer.h.0.attn.c_attn`,
`transformer.h.0.mlp.c_fc`, ...), with `nn.Linear` weights (the checkpoint's `Conv1D` weights
are the transpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import fresh_seed, seeded_normal_


@dataclass(frozen=True, kw_only=True)
class GPT2Config:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the position table covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as in GPT-2
    flash: bool = False  # F.scaled_dot_product_attention instead of the explicit softmax
    tie_word_embeddings: bool = True  # lm_head shares wte's weight, as in GPT-2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config: n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(each head gets n_embd // n_head features)."
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        # key, query, value projections for all heads, fused: output is [Q | K | V]
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding dimensionality (n_embd)

        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )  # (B, nh, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
            # causal mask, made here rather than held as a buffer: a model built on the meta
            # device then has nothing but parameters to materialise
            future = x.new_ones((T, T), dtype=torch.bool).triu(1)
            att = att.masked_fill(future, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)

        out: torch.Tensor = self.resid_dropout(self.c_proj(y))  # (B, T, C)
        return out


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.gelu(x)
        x = self.c_proj(x)  # (B, T, C)
        out: torch.Tensor = self.dropout(x)
        return out


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2(nn.Module):
    """GPT-2 language model: `forward(idx, targets=None) -> (logits, loss)`.

    Builds on `torch.device("meta")` without allocating weights.
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.init_seed = fresh_seed()  # first: the same whether built on meta or not
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output layer share one Parameter
        if config.tie_word_embeddings:
            cast(nn.Embedding, self.transformer.wte).weight = self.lm_head.weight

        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, seed: int | None = None) -> None:
        """Fill `tensor` as parameter `name` is initialised (nanoGPT's scheme: N(0, 0.02),
        residual projections scaled by 1/sqrt(2 n_layer), zero biases, unit LayerNorm
        weights), from a generator of its own: see models/init.py."""
        seed = self.init_seed if seed is None else seed
        if name.endswith("bias"):
            tensor.zero_()
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            tensor.fill_(1.0)
        else:
            std = 0.02
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            seeded_normal_(tensor, std, seed, name)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t,)

        # the ModuleDict's entries, typed (attribute access on a Module is Tensor | Module)
        wte = cast(nn.Embedding, self.transformer.wte)
        wpe = cast(nn.Embedding, self.transformer.wpe)
        drop = cast(nn.Dropout, self.transformer.drop)
        h = cast(nn.ModuleList, self.transformer.h)
        ln_f = cast(nn.LayerNorm, self.transformer.ln_f)

        tok_emb = wte(idx)  # token embeddings (b, t, n_embd)
        pos_emb = wpe(pos)  # position embeddings (t, n_embd)
        x = drop(tok_emb + pos_emb)
        for block in h:
            x = block(x)
        x = ln_f(x)
        logits = self.lm_head(x)  # (b, t, vocab_size)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        return logits, loss

    def example_inputs(
        self, batch: int = 2, seq: int = 8, targets: bool = True
    ) -> dict[str, torch.Tensor]:
        """Seeded random token ids on the model's device: `{"idx": ..., "targets": ...}`."""
        if seq > self.config.block_size:
            raise ValueError(
                f"example_inputs: seq={seq} exceeds block_size={self.config.block_size}; "
                f"ask for a shorter sequence or build the model with a larger block_size."
            )
        device = next(self.parameters()).device
        g = torch.Generator(device="cpu").manual_seed(0)
        vocab = self.config.vocab_size
        out = {"idx": torch.randint(0, vocab, (batch, seq), generator=g, device="cpu")}
        if targets:
            out["targets"] = torch.randint(0, vocab, (batch, seq), generator=g, device="cpu")
        return {k: v.to(device) for k, v in out.items()}
