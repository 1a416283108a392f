"""The fuzzer's option tables: the spellings the generator picks from (tp degrees,
linears, activations, qkv splits, head counts, softmaxes, head merges, escapes of split
values, dropout traps), `HELPERS`, the helper source snippets a drawn model may
include, and `FEATURES`, every tag the grammar can produce."""

from __future__ import annotations

TPS = (2, 4)
LINEARS = (
    "module", "functional", "module_kw", "functional_kw", "matmul", "torch_matmul",
    "matmul_T", "matmul_t",  # x @ W.T and torch.matmul(x, W.t()) with W [out, in] (Falcon)
    "conv1d",  # a kernel-1 nn.Conv1d over x.transpose(1, 2) (speech and TTS models)
)  # fmt: skip
# activation kind -> form -> (init expression or None, call template on {h})
ACTS: dict[str, dict[str, tuple[str | None, str]]] = {
    "gelu": {"module": ("nn.GELU()", ""), "functional": (None, "F.gelu({h})")},
    "gelu_tanh": {
        "module": ('nn.GELU(approximate="tanh")', ""),
        "functional": (None, 'F.gelu({h}, approximate="tanh")'),
        "formula": (
            None,
            "0.5 * {h} * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * "
            "({h} + 0.044715 * torch.pow({h}, 3.0))))",
        ),
    },
    "relu": {
        "module": ("nn.ReLU()", ""),
        "functional": (None, "F.relu({h})"),
        "method": (None, "{h}.relu()"),
        "torch": (None, "torch.relu({h})"),
    },
    "silu": {
        "module": ("nn.SiLU()", ""),
        "functional": (None, "F.silu({h})"),
        "formula": (None, "{h} * torch.sigmoid({h})"),
        "method": (None, "{h} * {h}.sigmoid()"),
    },
    "tanh": {
        "module": ("nn.Tanh()", ""),
        "method": (None, "{h}.tanh()"),
        "torch": (None, "torch.tanh({h})"),
    },
}
QKV_SPLITS = {
    "split_attr": "qkv.split(self.n_embd, dim=2)",
    "split_C": "qkv.split(C, dim=-1)",
    "chunk_kw": "qkv.chunk(3, dim=-1)",
    "chunk_pos": "qkv.chunk(3, -1)",
    "unbind": "qkv.view(B, T, 3, C).unbind(2)",  # ModernBERT
}
HEADS = {  # how the head count is spelled in the view to (B, T, heads, head_dim)
    "literal": "{t}.view(B, T, {H}, {hd})",
    "minus_one": "{t}.view(B, T, -1, {hd})",
    "computed": "{t}.view(B, T, C // {hd}, {hd})",
    "attr": "{t}.view(B, T, self.n_head, C // self.n_head)",
    "size_div": "{t}.view(B, T, {t}.size(-1) // self.hd, self.hd)",
    "reshape": "{t}.reshape(B, T, {H}, {hd})",
}
SOFTMAXES = {
    "functional": "F.softmax(att, dim=-1)",
    "method": "att.softmax(dim=-1)",
    "torch": "torch.softmax(att, -1)",
    "module": "self.softmax(att)",
}
MERGES = {
    "view": "y.transpose(1, 2).contiguous().view(B, T, C)",
    "reshape": "y.transpose(1, 2).reshape(B, T, -1)",
    "flatten": "y.transpose(1, 2).flatten(2)",
}
# escapes of a split value inside a split block: lines applied to the split hidden `h`
ESCAPES: dict[str, list[str]] = {
    "mT": ["h = h.mT.mT"],
    "T2d": ["h = h.reshape(-1, h.size(-1)).T.T.reshape(h.shape)"],
    "data_stat": ["h = h / (1.0 + h.data.abs().mean())"],
    "list_index_last": ["aux = h[..., [0, 1]].sum(-1, keepdim=True)"],
    "list_index_batch": ["h = h * h[[0]]"],
    "tensor_index_batch": ["h = h + h[torch.arange(h.size(0) - 1, -1, -1, device=h.device)]"],
    "expand_args": ["h = h + h.mean(1, keepdim=True).expand(B, T, {F})"],
    "softmax_nodim": ["h = self.sm(h)"],
    "layer_norm_fn": ["h = F.layer_norm(h, h.shape[-1:])"],
    "mean_empty_dim": ["h = h - h.mean(dim=())"],
    "sum_split_dim": ["aux = h.sum(-1, keepdim=True)"],
    "return_split": [],  # h is returned from the block (in the model's output container)
    "weight_expr": [],  # the row linear is F.linear(h, self.proj_w * 1.0, ...)
}
DROPOUTS = {
    "p1_train": "h = h + F.dropout(h, p=1.0, training=True)",  # adds exact zeros
    "p05_eval": "h = F.dropout(h, 0.5, training=False)",
    "p0_train": "h = F.dropout(h, p=0.0, training=True)",
    "p05_self_training_eval": None,  # F.dropout(h, 0.5, self.training) in an eval module
}
HELPERS = {
    "rotate_half": """
def rotate_half(t):
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat((-t2, t1), dim=-1)""",
    "rotate_every_two": """
def rotate_every_two(t):
    t1, t2 = t[..., ::2], t[..., 1::2]
    return torch.stack((-t2, t1), dim=-1).flatten(-2)""",
    "GradReverse": """
class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g""",
    "RoundST": """
class RoundST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4.0) / 4.0

    @staticmethod
    def backward(ctx, g):
        return g""",
    "double_output": """
def double_output(module, args, output):
    if isinstance(output, tuple):  # a block that also returns an extra value
        return (output[0] * 2.0, *output[1:])
    return output * 2.0""",
    "shift_input": """
def shift_input(module, args):
    return (args[0] + 1.0,) + tuple(args[1:])""",
}


def _all_features() -> frozenset[str]:
    """Every tag the grammar can produce (so a test can check the generator reaches all)."""
    tags = {f"tp:{t}" for t in TPS} | {"heads_indivisible", "bias:none"}
    tags |= {f"hidden:{c}" for c in (8, 16, 32)} | {f"layers:{n}" for n in (1, 2)}
    tags |= {f"input:{s}" for s in ("x", "ids")}
    tags |= {f"block:{b}" for b in ("mlp", "glu", "moe", "attn_fused", "attn_separate")}
    tags |= {f"linear:{s}" for s in LINEARS}
    tags |= {f"act:{k}" for k in ACTS} | {f"act_form:{f}" for v in ACTS.values() for f in v}
    tags |= {f"qkv_split:{s}" for s in QKV_SPLITS} | {f"heads:{s}" for s in HEADS}
    tags |= {f"softmax:{s}" for s in SOFTMAXES} | {f"merge:{s}" for s in MERGES}
    tags |= {f"context:{s}" for s in ("matmul_op", "torch_matmul", "einsum")}
    tags |= {f"attn:{s}" for s in ("matmul", "einsum", "sdpa", "bmm_folded", "causal", "rotary")}
    tags |= {"sizes:apart", "sizes:batch_1"}  # called at other sizes than planned
    tags |= {"attn:per_head_scale", "attn:alibi", "escape:attn_probs", "attn:qkv_per_head"}
    tags |= {"attn:rotary_interleaved", "attn:qk_norm", "attn:gqa"}
    tags |= {f"mask:{m}" for m in ("additive", "bool")}
    tags |= {f"residual:{r}" for r in ("pre_ln", "post_ln", "parallel")}
    tags |= {f"parallel_sum:{r}" for r in ("residual_first", "residual_last")}
    tags |= {f"head:{h}" for h in ("untied", "tied_module", "tied_functional", "tied_matmul")}
    tags |= {f"loss:{x}" for x in ("functional", "module", "sum", "flatten")}
    tags |= {f"output:{o}" for o in ("tuple", "tensor", "dict", "nested", "list", "namedtuple")}
    tags |= {f"escape:{e}" for e in ESCAPES}
    tags |= {f"trap:dropout_{d}" for d in DROPOUTS}
    tags |= {f"trap:hook:{h}" for h in ("fwd", "pre", "fwd_leaf")}
    tags |= {f"trap:autograd_{f}" for f in ("GradReverse", "RoundST", "GradReverse_model")}
    tags |= {f"mode:{m}" for m in ("train->eval", "eval->train", "eval->eval")}
    tags |= {
        "trap:inplace_split", "trap:inplace_input", "trap:eval_submodule", "trap:tie_qk",
        "trap:training_branch", "trap:no_grad_side", "trap:no_grad_block", "trap:noise",
        "tool:comm_debug_mode",
    }  # fmt: skip
    return frozenset(tags)


FEATURES = _all_features()
