"""The peers autotp is measured against, on the same models, and a neutral collective count.

- `CollectiveCounter`: every collective dispatched on this rank while it is active, as
  (phase, op, payload bytes), seen at the dispatcher, so autotp's `dist.all_reduce`s and
  DTensor's functional collectives are counted by the same code from what ran.
- `dtensor_model`: PyTorch's own tensor parallel, `parallelize_module` with the
  hand-written Colwise/Rowwise plan a user writes for each model (reference GPT-2 and BERT,
  and the Hugging Face ones), plus the model edits DTensor needs: local head counts in the
  attention forward, the fused QKV weight regrouped by heads, GPT-2's `Conv1D`s as
  `nn.Linear`s, tied weights re-tied. The loss runs under `loss_parallel()`.
- `MegatronGPT2`: the reference GPT-2 as a Megatron-LM user writes it by hand: plain local
  tensors, column/row-parallel linears, one `f` per block input, one `g` per block output,
  a vocab-parallel embedding and cross-entropy.

Each is built from the serial model's weights, so all compute the serial function (checked
in tests/test_peers.py in float64).
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------------------------------
# counting


_NAMESPACES = {"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"}
_COLLECTIVE_WORDS = ("reduce", "gather", "scatter", "all_to_all", "alltoall", "broadcast")


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _normalise(op: str) -> str:
    op = op.rstrip("_")
    if op in ("allreduce", "all_reduce", "allreduce_coalesced", "all_reduce_coalesced"):
        return "all_reduce"
    if "gather" in op:
        return "all_gather"
    if "reduce_scatter" in op:
        return "reduce_scatter"
    return op


class Collective(NamedTuple):
    phase: str  # "forward", or "backward" when autograd's engine ran it
    op: str  # all_reduce, all_gather, reduce_scatter, ...
    elements: int  # of the tensor(s) this rank passes in
    nbytes: int


class CollectiveCounter(TorchDispatchMode):
    """Collectives dispatched on this rank while active, in `log`. Ops on DTensors are
    first let through (NotImplemented), so the collectives DTensor desugars them into
    are what is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[Collective] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        if any(issubclass(t, DTensor) for t in types_):
            return NotImplemented
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace in _NAMESPACES and any(w in name for w in _COLLECTIVE_WORDS):
            op = _normalise(name)
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            # c10d's in-place all-gathers take (outputs, inputs); the others take the
            # input first
            payload = args[1] if name in ("allgather_", "_allgather_base_") else args[0]
            tensors = _tensors(payload)
            elements = sum(t.numel() for t in tensors)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            self.log.append(Collective(phase, op, elements, nbytes))
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# PyTorch DTensor tensor parallel, with the plan and the model edits a user writes


def _conv1d_to_linear(model: nn.Module) -> None:
    """Hugging Face GPT-2's `Conv1D` (weight [in, out]) is not a module
    Colwise/RowwiseParallel accept: swap each for the `nn.Linear` it is."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv1D":
                n_in, n_out = child.weight.shape
                lin = nn.Linear(n_in, n_out, dtype=child.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)


def _regroup_qkv(linear: nn.Linear, tp: int) -> None:
    """Reorder a fused [Q | K | V] projection's output features to [Q_0 K_0 V_0 | Q_1 ...]
    so that a contiguous Shard(0) gives rank r its own heads of all three."""
    with torch.no_grad():
        for p in (linear.weight, linear.bias):
            if p is None:
                continue
            parts = p.chunk(3, dim=0)  # Q, K, V, each [C, ...]
            per_rank = [torch.cat([x.chunk(tp, dim=0)[r] for x in parts]) for r in range(tp)]
            p.copy_(torch.cat(per_rank))


def _causal_attention(qkv: torch.Tensor, n_head: int, flash: bool) -> torch.Tensor:
    """GPT-2's attention over a rank's heads: `qkv` is (B, T, 3 * width) laid out
    [Q | K | V] of those heads; returns (B, T, width). No dropout (the bench runs none)."""
    B, T, three_width = qkv.shape
    width = three_width // 3
    q, k, v = (t.view(B, T, n_head, width // n_head).transpose(1, 2) for t in qkv.split(width, 2))
    if flash:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        future = qkv.new_ones((T, T), dtype=torch.bool).triu(1)
        y = F.softmax(att.masked_fill(future, float("-inf")), dim=-1) @ v
    return y.transpose(1, 2).contiguous().view(B, T, width)


def _gpt2_local_attention(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference GPT-2 attention with the local width: the model's own forward takes
    C from its input and `n_head` from its config, both wrong on a shard."""
    return self.c_proj(_causal_attention(self.c_attn(x), self.n_head // self.tp, self.flash))


def _bert_local_attention(self: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference BERT self-attention with the local width (see above)."""
    B, T, _ = x.size()
    nh = self.num_heads // self.tp
    q = self.query(x).view(B, T, nh, self.head_dim).transpose(1, 2)
    k = self.key(x).view(B, T, nh, self.head_dim).transpose(1, 2)
    v = self.value(x).view(B, T, nh, self.head_dim).transpose(1, 2)
    att = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask, dim=-1)
    y = self.dropout(att) @ v
    return y.transpose(1, 2).contiguous().view(B, T, nh * self.head_dim)


def _shard_vocab_bias(module: nn.Module, mesh: DeviceMesh) -> None:
    """BERT's MLM head adds a vocab-sized bias to logits that are DTensors split along the
    vocabulary: split the bias the same way."""
    module.bias = nn.Parameter(distribute_tensor(module.bias.detach(), mesh, [Shard(0)]))


def _retie(model: nn.Module, a: str, b: str) -> None:
    """Point module path `b`'s weight at module path `a`'s (distributed) weight."""
    model.get_submodule(b).weight = model.get_submodule(a).weight


# (layer list, column-split linears, row-split linears, embedding, output layer), per family
_LAYOUTS = {
    "gpt2": ("transformer.h", ("attn.c_attn", "mlp.c_fc"), ("attn.c_proj", "mlp.c_proj"),
             "transformer.wte", "lm_head"),
    "bert": ("bert.encoder.layer",
             ("attention.self.query", "attention.self.key", "attention.self.value",
              "intermediate.dense"),
             ("attention.output.dense", "output.dense"),
             "bert.embeddings.word_embeddings", "cls.predictions.decoder"),
}  # fmt: skip


def _plan(family: str, n_layer: int) -> dict[str, Any]:
    """The Colwise/Rowwise plan of PyTorch's tensor-parallel tutorial, spelled out for
    every layer: column-split linears, row-split linears, the embedding split along the
    vocabulary, the output layer's logits left split for `loss_parallel`."""
    layers, columns, rows, embedding, head = _LAYOUTS[family]
    plan: dict[str, Any] = {
        embedding: RowwiseParallel(input_layouts=Replicate()),
        head: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i in range(n_layer):
        plan |= {f"{layers}.{i}.{name}": ColwiseParallel() for name in columns}
        plan |= {f"{layers}.{i}.{name}": RowwiseParallel() for name in rows}
    return plan


def dtensor_model(kind: str, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """A copy of `model` parallelised with DTensor over the 1-D `mesh`.

    kind: "gpt2" / "bert" (the reference models), "hf-gpt2" / "hf-bert-mlm"
    (transformers' GPT2LMHeadModel and BertForMaskedLM)."""
    if kind not in ("gpt2", "hf-gpt2", "bert", "hf-bert-mlm"):
        raise ValueError(f"dtensor_model: unknown kind {kind!r}")
    tp = mesh.size()
    model = copy.deepcopy(model)
    family = "gpt2" if kind.endswith("gpt2") else "bert"
    if kind == "hf-gpt2":
        _conv1d_to_linear(model)
    if kind == "gpt2" and model.config.dropout:
        raise ValueError("dtensor_model: the local GPT-2 attention here runs no dropout")
    if family == "gpt2":
        for block in model.transformer.h:
            _regroup_qkv(block.attn.c_attn, tp)
            if kind == "gpt2":
                block.attn.tp = tp
                block.attn.forward = types.MethodType(_gpt2_local_attention, block.attn)
            else:
                block.attn.split_size //= tp  # transformers' views use -1 heads
    elif kind == "bert":  # transformers' BERT views heads as -1: nothing to edit there
        for layer in model.bert.encoder.layer:
            attention = layer.attention.self
            attention.tp = tp
            attention.forward = types.MethodType(_bert_local_attention, attention)
    n_layer = model.config.n_layer if family == "gpt2" else model.config.num_hidden_layers
    parallelize_module(model, mesh, _plan(family, n_layer))
    if kind == "bert":
        _shard_vocab_bias(model.cls.predictions, mesh)
    elif kind == "hf-bert-mlm":  # the head's bias is the decoder's, which was split
        model.cls.predictions.bias = model.cls.predictions.decoder.bias
    if getattr(model.config, "tie_word_embeddings", True):
        _retie(model, _LAYOUTS[family][3], _LAYOUTS[family][4])
    return model


# ---------------------------------------------------------------------------------------
# Megatron-LM, written by hand for the reference GPT-2


class _CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: ANN001
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: ANN001
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad, None


class _VocabParallelCE(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy (mean over the rows whose target is not
    -100): three all-reduces of one number per row; the backward is local (softmax minus
    one-hot on this rank's slice)."""

    @staticmethod
    def forward(ctx, logits, target, start, group):  # noqa: ANN001
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        valid = target != -100
        local = target - start
        mine = (local >= 0) & (local < logits.size(-1)) & valid
        local = local.clamp(0, logits.size(-1) - 1)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(picked, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(softmax, local, mine, valid, count)
        return ((sum_exp.log() - picked) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        softmax, local, mine, valid, count = ctx.saved_tensors
        g = softmax * valid.to(softmax.dtype).unsqueeze(-1)
        g.scatter_add_(-1, local.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        return g * (grad / count), None, None, None


def _cut(t: torch.Tensor, dim: int, rank: int, tp: int) -> nn.Parameter:
    return nn.Parameter(t.detach().chunk(tp, dim=dim)[rank].clone())


class _MegatronBlock(nn.Module):
    def __init__(self, block: nn.Module, rank: int, tp: int, group: Any) -> None:
        super().__init__()
        self.group = group
        self.n_head = block.attn.n_head // tp
        self.flash = block.attn.flash
        self.ln_1, self.ln_2 = copy.deepcopy(block.ln_1), copy.deepcopy(block.ln_2)
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        # column-parallel QKV: this rank's heads of each of Q, K and V
        self.qkv_w = nn.Parameter(torch.cat([_cut(x, 0, rank, tp) for x in w.chunk(3)]).detach())
        self.qkv_b = nn.Parameter(torch.cat([_cut(x, 0, rank, tp) for x in b.chunk(3)]).detach())
        self.proj_w = _cut(block.attn.c_proj.weight, 1, rank, tp)  # row-parallel
        self.proj_b = nn.Parameter(block.attn.c_proj.bias.detach().clone())
        self.fc_w = _cut(block.mlp.c_fc.weight, 0, rank, tp)
        self.fc_b = _cut(block.mlp.c_fc.bias, 0, rank, tp)
        self.out_w = _cut(block.mlp.c_proj.weight, 1, rank, tp)
        self.out_b = nn.Parameter(block.mlp.c_proj.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _CopyToTP.apply(self.ln_1(x), self.group)
        h = _causal_attention(F.linear(h, self.qkv_w, self.qkv_b), self.n_head, self.flash)
        h = _ReduceFromTP.apply(F.linear(h, self.proj_w), self.group)
        x = x + h + self.proj_b
        h = _CopyToTP.apply(self.ln_2(x), self.group)
        h = F.gelu(F.linear(h, self.fc_w, self.fc_b), approximate="tanh")
        h = _ReduceFromTP.apply(F.linear(h, self.out_w), self.group)
        return x + h + self.out_b


class MegatronGPT2(nn.Module):
    """This rank's shard of the reference GPT-2 (tied embeddings, no dropout), written the
    Megatron-LM way: `forward(idx, targets) -> (local logits, loss)`. The vocabulary must
    divide by tp (the bench picks one that does)."""

    def __init__(self, model: nn.Module, rank: int, tp: int, group: Any = None) -> None:
        super().__init__()
        cfg = model.config
        if cfg.dropout or not cfg.tie_word_embeddings or cfg.vocab_size % tp:
            raise ValueError("MegatronGPT2: tied embeddings, no dropout, vocab % tp == 0")
        self.group = group
        self.start = rank * cfg.vocab_size // tp
        self.wte = _cut(model.transformer.wte.weight, 0, rank, tp)  # vocab-parallel, tied
        self.wpe = copy.deepcopy(model.transformer.wpe)
        self.h = nn.ModuleList(_MegatronBlock(b, rank, tp, group) for b in model.transformer.h)
        self.ln_f = copy.deepcopy(model.transformer.ln_f)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        local = idx - self.start
        outside = (local < 0) | (local >= self.wte.size(0))
        emb = F.embedding(local.masked_fill(outside, 0), self.wte)
        emb = _ReduceFromTP.apply(emb.masked_fill(outside.unsqueeze(-1), 0.0), self.group)
        x = emb + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        x = _CopyToTP.apply(self.ln_f(x), self.group)
        logits = F.linear(x, self.wte)  # (B, T, vocab / tp)
        loss = _VocabParallelCE.apply(
            logits.flatten(0, 1), targets.flatten(), self.start, self.group
        )
        return logits, loss


class _MegatronBertLayer(nn.Module):
    """A post-LN BERT layer: separate Q, K and V column-parallel (this rank's heads of
    each), the attention output and the MLP's second linear row-parallel."""

    def __init__(self, layer: nn.Module, rank: int, tp: int, group: Any) -> None:
        super().__init__()
        att, self.group = layer.attention, group
        self.n_head, self.head_dim = att.self.num_heads // tp, att.self.head_dim
        for name in ("query", "key", "value"):
            lin = getattr(att.self, name)
            setattr(self, f"{name}_w", _cut(lin.weight, 0, rank, tp))
            setattr(self, f"{name}_b", _cut(lin.bias, 0, rank, tp))
        self.ao_w = _cut(att.output.dense.weight, 1, rank, tp)
        self.ao_b = nn.Parameter(att.output.dense.bias.detach().clone())
        self.ln_a = copy.deepcopy(att.output.LayerNorm)
        self.fc_w = _cut(layer.intermediate.dense.weight, 0, rank, tp)
        self.fc_b = _cut(layer.intermediate.dense.bias, 0, rank, tp)
        self.out_w = _cut(layer.output.dense.weight, 1, rank, tp)
        self.out_b = nn.Parameter(layer.output.dense.bias.detach().clone())
        self.ln_o = copy.deepcopy(layer.output.LayerNorm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = _CopyToTP.apply(x, self.group)
        q, k, v = (
            F.linear(h, getattr(self, f"{n}_w"), getattr(self, f"{n}_b"))
            .view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            for n in ("query", "key", "value")
        )  # fmt: skip
        att = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, -1)
        y = _ReduceFromTP.apply(F.linear(y, self.ao_w), self.group)
        a = self.ln_a(x + y + self.ao_b)
        h = F.gelu(F.linear(_CopyToTP.apply(a, self.group), self.fc_w, self.fc_b))
        h = _ReduceFromTP.apply(F.linear(h, self.out_w), self.group)
        return self.ln_o(a + h + self.out_b)


class MegatronBERT(nn.Module):
    """This rank's shard of the reference BERT for masked LM (post-LN, tied decoder, no
    dropout), written the Megatron-LM way: `forward(input_ids, labels) -> (local logits,
    loss)`, the vocabulary split for the embedding, the decoder and the loss."""

    def __init__(self, model: nn.Module, rank: int, tp: int, group: Any = None) -> None:
        super().__init__()
        cfg = model.config
        if cfg.dropout or cfg.pre_ln or not cfg.tie_word_embeddings or cfg.vocab_size % tp:
            raise ValueError("MegatronBERT: post-LN, tied, no dropout, vocab % tp == 0")
        emb, head = model.bert.embeddings, model.cls.predictions
        self.group, self.start = group, rank * cfg.vocab_size // tp
        self.wte = _cut(emb.word_embeddings.weight, 0, rank, tp)  # vocab-parallel, tied
        self.wpe = copy.deepcopy(emb.position_embeddings)
        self.tte = copy.deepcopy(emb.token_type_embeddings)
        self.ln_e = copy.deepcopy(emb.LayerNorm)
        self.layers = nn.ModuleList(
            _MegatronBertLayer(layer, rank, tp, group) for layer in model.bert.encoder.layer
        )
        self.dense = copy.deepcopy(head.transform.dense)
        self.ln_h = copy.deepcopy(head.transform.LayerNorm)
        self.bias = _cut(head.bias, 0, rank, tp)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.wte.size(0))
        x = F.embedding(local.masked_fill(outside, 0), self.wte)
        x = _ReduceFromTP.apply(x.masked_fill(outside.unsqueeze(-1), 0.0), self.group)
        T = input_ids.size(1)
        x = x + self.wpe(torch.arange(T, device=x.device))
        x = self.ln_e(x + self.tte(torch.zeros_like(input_ids)))
        mask = x.new_zeros(x.size(0), 1, 1, T)  # no padding: every key attended
        for layer in self.layers:
            x = layer(x, mask)
        h = _CopyToTP.apply(self.ln_h(F.gelu(self.dense(x))), self.group)
        logits = F.linear(h, self.wte) + self.bias  # (B, T, vocab / tp)
        loss = _VocabParallelCE.apply(logits.flatten(0, 1), labels.flatten(), self.start,
                                      self.group)  # fmt: skip
        return logits, loss


# ---------------------------------------------------------------------------------------
# one training step of each


def step(module: nn.Module, inputs: dict, *, dtensor: bool = False) -> torch.Tensor:
    """Forward and backward (under `loss_parallel()` for a DTensor model, whose logits
    are split DTensors). Returns the loss, detached."""
    with loss_parallel() if dtensor else contextlib.nullcontext():
        out = module(**inputs)
        loss = out[1] if isinstance(out, tuple) else out.loss
        loss.backward()
    if isinstance(loss, DTensor):
        loss = loss.full_tensor()
    return loss.detach()
