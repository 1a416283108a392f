"""BERT for masked language modelling in one file, with Hugging Face parameter names.

Plain PyTorch, no parallel awareness: this is the serial model that autotp traces and
splits. The forward is written to pass `torch.fx` symbolic tracing: the only branches are
on Python values (`pre_ln`, `is None` for optional inputs), never on tensor values.

Two layer-norm placements, same parameter names:

    post-LN (original BERT, pre_ln=False)        pre-LN (Megatron-LM, pre_ln=True)
    a = LN_a(x + attn(x))                        a = x + attn(LN_a(x))
    y = LN_o(a + mlp(a))                         y = a + mlp(LN_o(a))
                                                 ... final_layer_norm after the last layer

where LN_a is `attention.output.LayerNorm` and LN_o is `output.LayerNorm`. The Megatron-LM
paper (Shoeybi et al., 2019) found that post-LN BERT degrades beyond BERT-Large size while
pre-LN keeps improving.

    x = LN(word_embeddings(ids) + position_embeddings(pos) + token_type_embeddings(tt))
    for each layer:
        attention: query, key, value (separate Linears) -> heads -> attention.output.dense
        mlp:       intermediate.dense -> gelu (erf) -> output.dense
    logits = decoder(LN(gelu(transform.dense(x)))) + cls.predictions.bias  # decoder tied
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import fresh_seed, seeded_normal_


@dataclass(frozen=True, kw_only=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    tie_word_embeddings: bool = True  # the MLM decoder shares the word embeddings
    pre_ln: bool = False  # layer norm at each sub-block's input (Megatron-LM) instead of output

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads} "
                f"(each head gets hidden_size // num_attention_heads features)."
            )


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.size()
        pos = torch.arange(0, T, dtype=torch.long, device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids)  # (B, T, C)
        x = x + self.position_embeddings(pos)  # (T, C) broadcast over B
        x = x + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        out: torch.Tensor = self.dropout(self.LayerNorm(x))
        return out


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, hidden_size
        # (B, T, C) -> (B, nh, T, hs) for each of q, k, v
        q = self.query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        att = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        att = att + mask  # (B, 1, 1, T): -10000 on padded keys
        att = F.softmax(att, dim=-1)
        att = self.dropout(att)
        y: torch.Tensor = att @ v  # (B, nh, T, hs)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)


class BertOutput(nn.Module):
    """dense -> dropout -> residual, with the sub-block's LayerNorm (`attention.output` and
    `output` in HF naming). Post-LN applies `LayerNorm` here; pre-LN applies it at the
    sub-block input (in the caller), so here it only adds the residual."""

    def __init__(self, config: BertConfig, in_features: int) -> None:
        super().__init__()
        self.pre_ln = config.pre_ln
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.dense(h))  # (B, T, C)
        if self.pre_ln:
            return residual + h
        out: torch.Tensor = self.LayerNorm(residual + h)
        return out


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.pre_ln = config.pre_ln
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.output.LayerNorm(x) if self.pre_ln else x
        out: torch.Tensor = self.output(self.self(h, mask), x)
        return out


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU()  # exact (erf) GELU, as in BERT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.intermediate_act_fn(self.dense(x))  # (B, T, intermediate_size)
        return out


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.pre_ln = config.pre_ln
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask)  # (B, T, C)
        h = self.output.LayerNorm(a) if self.pre_ln else a
        out: torch.Tensor = self.output(self.intermediate(h), a)  # (B, T, C)
        return out


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        if config.pre_ln:
            self.final_layer_norm: nn.LayerNorm | None = nn.LayerNorm(
                config.hidden_size, eps=config.layer_norm_eps
            )
        else:
            self.final_layer_norm = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x


class BertModel(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        # 1 = attend, 0 = padding; additive mask broadcast over heads and queries
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0  # (B, 1, 1, T)
        out: torch.Tensor = self.encoder(x, mask)
        return out


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.transform_act_fn(self.dense(x)))
        return out


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.transform(x)) + self.bias  # (B, T, vocab_size)
        return out


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.predictions(x)
        return out


class BertForMaskedLM(nn.Module):
    """BERT with the masked-LM head:
    `forward(input_ids, attention_mask=None, token_type_ids=None, labels=None) -> (logits, loss)`.

    Builds on `torch.device("meta")` without allocating weights.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.init_seed = fresh_seed()  # first: the same whether built on meta or not
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        # weight tying: the MLM decoder shares the word-embedding Parameter
        if config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, seed: int | None = None) -> None:
        """Fill `tensor` as parameter `name` is initialised (BERT's scheme: N(0, 0.02)
        weights and embeddings, zero biases, unit LayerNorm weights), from a generator of
        its own: see models/init.py."""
        seed = self.init_seed if seed is None else seed
        if name.endswith("bias"):
            tensor.zero_()
        elif "LayerNorm" in name or "final_layer_norm" in name:
            tensor.fill_(1.0)
        else:
            seeded_normal_(tensor, 0.02, seed, name)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)

        x = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        logits = self.cls(x)  # (B, T, vocab_size)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100
            )
        return logits, loss

    def example_inputs(
        self, batch: int = 2, seq: int = 8, mask: bool = True, labels: bool = True
    ) -> dict[str, torch.Tensor]:
        """Seeded inputs on the model's device, as forward's keyword arguments.

        `attention_mask` pads row i with min(i * seq // (2 * batch), seq - 1) zeros at the
        end; `token_type_ids` marks the second half of each row as segment 1; `labels` keeps
        about 30% of the ids (always position 0, never padding) and sets the rest to -100.
        The optional entries are omitted when turned off.
        """
        cfg = self.config
        if seq > cfg.max_position_embeddings:
            raise ValueError(
                f"example_inputs: seq={seq} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}; ask for a shorter sequence or build the model "
                f"with a larger max_position_embeddings."
            )
        device = next(self.parameters()).device
        g = torch.Generator(device="cpu").manual_seed(0)
        input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, device="cpu")
        out = {"input_ids": input_ids}

        n_pad = [min(i * seq // (2 * batch), seq - 1) for i in range(batch)]
        attention_mask = torch.ones(batch, seq, dtype=torch.long, device="cpu")
        for i, n in enumerate(n_pad):
            if n:
                attention_mask[i, seq - n :] = 0
        if mask:
            out["attention_mask"] = attention_mask

        token_type_ids = torch.zeros(batch, seq, dtype=torch.long, device="cpu")
        if cfg.type_vocab_size > 1:
            token_type_ids[:, seq // 2 :] = 1
        out["token_type_ids"] = token_type_ids

        if labels:
            keep = torch.rand(batch, seq, generator=g, device="cpu") < 0.3
            keep[:, 0] = True
            keep &= attention_mask.bool()
            out["labels"] = torch.where(keep, input_ids, torch.full_like(input_ids, -100))
        return {k: v.to(device) for k, v in out.items()}
