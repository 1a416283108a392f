"""Small Hugging Face models built from configs (random weights, nothing downloaded)."""

from __future__ import annotations

import contextlib

import torch

transformers = __import__("pytest").importorskip("transformers")
transformers.logging.set_verbosity_error()

# HF casts to float32 inside the model (GPT-2's and Llama's loss upcast logits with
# .float(); Llama's RMSNorm computes in float32), so in float64 those values carry float32
# rounding in the serial model too: compare them relatively at float32 precision.
RTOL_FLOAT32_INSIDE = {"gpt2": 1e-6, "llama": 1e-6, "qwen2": 1e-6, "bert": 0.0, "bert-mlm": 0.0}


def build(name: str, *, layers: int = 2, heads: int = 4, kv_heads: int | None = None,
          head_dim: int = 8, vocab: int = 101, seed: int = 0) -> torch.nn.Module:  # fmt: skip
    torch.manual_seed(seed)
    hidden = heads * head_dim
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            n_positions=64, n_embd=hidden, n_layer=layers, n_head=heads, use_cache=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    if name in ("bert", "bert-mlm"):
        cfg = transformers.BertConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **common,
        )  # fmt: skip
        cls = transformers.BertForMaskedLM if name == "bert-mlm" else transformers.BertModel
        return cls(cfg)
    decoders = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}  # fmt: skip
    if name in decoders:
        config_cls, model_cls = (getattr(transformers, c) for c in decoders[name])
        cfg = config_cls(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
            max_position_embeddings=64, use_cache=False, **common,
        )  # fmt: skip
        return model_cls(cfg)
    raise ValueError(name)


def llama(*, vocab: int, hidden: int = 32, meta: bool = False) -> torch.nn.Module:
    """A float64 Llama in eval mode with 2 key/value heads for 4 query heads, as
    transformers' config gives it otherwise (use_cache on); on the meta device when
    `meta` (a program without weights, to plan or to fill from a folder)."""
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=vocab,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return transformers.LlamaForCausalLM(cfg).double().eval()


def inputs(name: str, vocab: int = 101, batch: int = 2, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    if name.startswith("bert"):
        mask = torch.ones_like(ids)
        mask[0, seq // 2 :] = 0
        x = {"input_ids": ids, "attention_mask": mask}
        if name == "bert-mlm":
            labels = ids.clone()
            labels[:, ::2] = -100
            x["labels"] = labels
        return x
    return {"input_ids": ids, "labels": ids}
