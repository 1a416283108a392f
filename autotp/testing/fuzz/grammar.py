"""The fuzzer's generator: writes one model's source from a `Choices` stream (option
tables in `tables`, `Choices` and `ModelCase` in `case`), the hypothesis strategy and
random draws built on it, the feature tags it can produce, plus `shrink`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .case import Choices, ModelCase, _HypothesisChoices
from .tables import (
    ACTS,
    DROPOUTS,
    ESCAPES,
    HEADS,
    HELPERS,
    LINEARS,
    MERGES,
    QKV_SPLITS,
    SOFTMAXES,
    TPS,
)

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

T_MAX = 6  # the longest sequence drawn: position buffers hold this many

# --------------------------------------------------------------------------- generator


@dataclass
class _Cls:
    name: str
    args: list[str]
    init: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)

    def source(self) -> str:
        lines = [f"class {self.name}(nn.Module):", "    def __init__(self):"]
        lines += ["        super().__init__()"] + ["        " + s for s in self.init]
        lines += ["", f"    def forward(self, {', '.join(self.args)}):"]
        lines += ["        " + s for s in self.body]
        return "\n".join(lines)


class _Gen:
    """Writes one model's source from a Choices stream."""

    def __init__(self, ch: Choices) -> None:
        self.ch = ch
        self.tags: set[str] = set()
        self.helpers: list[str] = []
        self.classes: list[_Cls] = []
        self.model_init: list[str] = []  # lines for Model.__init__ after the submodules

    def pick(self, kind: str, options: Sequence[Any]) -> Any:
        v = self.ch.pick(options)
        self.tags.add(f"{kind}:{v}")
        return v

    def flag(self, tag: str, p: float) -> bool:
        v = self.ch.flag(p)
        if v:
            self.tags.add(tag)
        return v

    def helper(self, name: str) -> str:
        if name not in self.helpers:
            self.helpers.append(name)
        return name

    def linear(
        self, cls: _Cls, name: str, fin: int, fout: int, *, bias: bool = True,
        spelling: str | None = None, tie: str | None = None, weight_expr: bool = False,
    ) -> Callable[[str], str]:  # fmt: skip
        """Declare a linear on `cls`; return a function from an input expression to the
        call expression."""
        s = spelling or self.ch.pick(LINEARS)
        if weight_expr:
            s = "functional"
        self.tags.add(f"linear:{s}")
        if s == "conv1d":  # channels first: a linear over dim 1 of x.transpose(1, 2)
            cls.init.append(f"self.{name} = nn.Conv1d({fin}, {fout}, 1, bias={bias})")
            if tie:
                cls.init.append(f"self.{name}.weight = self.{tie}.weight")
            return lambda x: f"self.{name}({x}.transpose(1, 2)).transpose(1, 2).contiguous()"
        if s in ("module", "module_kw"):
            cls.init.append(f"self.{name} = nn.Linear({fin}, {fout}, bias={bias})")
            if tie:
                cls.init.append(f"self.{name}.weight = self.{tie}.weight")
            kw = "input=" if s == "module_kw" else ""
            return lambda x: f"self.{name}({kw}{x})"
        out_in = s.startswith("functional") or s in ("matmul_T", "matmul_t")
        shape = f"{fout}, {fin}" if out_in else f"{fin}, {fout}"
        w, b = f"self.{name}_w", f"self.{name}_b"
        if tie:
            cls.init.append(f"{w} = self.{tie}_w")
        else:
            cls.init.append(f"{w} = nn.Parameter(torch.randn({shape}) / math.sqrt({fin}))")
        if bias:
            cls.init.append(f"{b} = nn.Parameter(0.1 * torch.randn({fout}))")
        wx = f"{w} * 1.0" if weight_expr else w
        if s == "functional":
            return lambda x: f"F.linear({x}, {wx}, {b})" if bias else f"F.linear({x}, {wx})"
        if s == "functional_kw":
            return lambda x: (
                f"F.linear({x}, weight={wx}, bias={b})" if bias else f"F.linear({x}, weight={wx})"
            )
        op = {
            "matmul": "{x} @ " + w, "torch_matmul": "torch.matmul({x}, " + w + ")",
            "matmul_T": "{x} @ " + w + ".T", "matmul_t": "torch.matmul({x}, " + w + ".t())",
        }[s]  # fmt: skip
        return lambda x: f"({op.format(x=x)} + {b})" if bias else f"({op.format(x=x)})"

    def activation(self, cls: _Cls, name: str, kinds: Sequence[str]) -> Callable[[str], str]:
        kind = self.pick("act", kinds)
        form = self.pick("act_form", list(ACTS[kind]))
        init, call = ACTS[kind][form]
        if init is not None:
            cls.init.append(f"self.{name} = {init}")
            return lambda h: f"self.{name}({h})"
        return lambda h: call.format(h=h)

    # ------------------------------------------------------------------ blocks

    def ffn(self, prefix: str, C: int, F_: int, allow_eval_sub: bool) -> tuple[_Cls, bool]:
        """An MLP or gated MLP; returns the class and whether it returns (y, extra)."""
        kind = self.pick("block", ("mlp", "glu", "moe"))
        cls = _Cls(f"{prefix}{kind.capitalize()}", ["x"])
        if kind == "moe":
            return self.moe(cls, C, F_), False
        escape = self.ch.pick(list(ESCAPES)) if self.ch.flag(0.35) else None
        if escape is not None:
            self.tags.add(f"escape:{escape}")
        bias = self.ch.pick((True, False))
        if not bias:
            self.tags.add("bias:none")
        body = cls.body
        body.append("B, T, _ = x.shape")
        if kind == "mlp":
            fc = self.linear(cls, "fc", C, F_, bias=bias)
            act = self.activation(cls, "act", ("gelu", "relu", "gelu_tanh", "silu", "tanh"))
            body.append(f"h = {fc('x')}")
            body.append(f"h = {act('h')}")
        else:
            gate = self.linear(cls, "gate", C, F_, bias=bias)
            up = self.linear(cls, "up", C, F_, bias=bias)
            act = self.activation(cls, "act", ("silu", "gelu", "relu"))
            body.append(f"g = {gate('x')}")
            body.append(f"h = {act('g')} * {up('x')}")
        if self.flag("trap:inplace_split", 0.06):
            body += ["h = h * 1.0", "h.add_(1.0)"]
        fn = self.ch.pick(("GradReverse", "RoundST")) if self.ch.flag(0.08) else None
        if fn is not None:
            self.tags.add(f"trap:autograd_{fn}")
            body.append(f"h = {self.helper(fn)}.apply(h)")
        drop = self.ch.pick(list(DROPOUTS)) if self.ch.flag(0.1) else None
        if drop == "p05_self_training_eval" and not allow_eval_sub:
            drop = "p05_eval"
        if drop is not None:
            self.tags.add(f"trap:dropout_{drop}")
            if drop == "p05_self_training_eval":
                body.append("h = F.dropout(h, 0.5, self.training)")
                self.model_init.append(f"self.{{path}}.eval()  # {cls.name}: no dropout")
            else:
                dropout = DROPOUTS[drop]
                assert dropout is not None  # only p05_self_training_eval's is None
                body.append(dropout)
        if allow_eval_sub and drop is None and self.flag("trap:eval_submodule", 0.07):
            cls.init.append("self.drop = nn.Dropout(0.5)")
            body.append("h = self.drop(h)")
            self.model_init.append(f"self.{{path}}.eval()  # {cls.name}: no dropout")
        if escape == "softmax_nodim":
            cls.init.append("self.sm = nn.Softmax()")
        for line in ESCAPES.get(escape or "", []):
            body.append(line.format(F=F_))
        proj = self.linear(cls, "proj", F_, C, bias=bias, weight_expr=escape == "weight_expr")
        body.append(f"y = {proj('h')}")
        if escape in ("list_index_last", "sum_split_dim"):
            body.append("y = y + aux")
        extra = escape == "return_split"
        body.append("return y, h" if extra else "return y")
        return cls, extra

    def moe(self, cls: _Cls, C: int, F_: int, experts: int = 4, k: int = 2) -> _Cls:
        """Top-k routed experts with a fused gate|up per expert, as transformers computes
        them (batched_mm): each token's copy through its expert's weights, W[ids]."""
        cls.init += [
            f"self.router = nn.Linear({C}, {experts}, bias=False)",
            f"self.w_gate_up = nn.Parameter(torch.randn({experts}, {2 * F_}, {C}) / {C**0.5})",
            f"self.w_down = nn.Parameter(torch.randn({experts}, {C}, {F_}) / {F_**0.5})",
        ]
        act = self.activation(cls, "act", ("silu", "gelu", "relu"))
        cls.body += [
            "B, T, _ = x.shape",
            f"h = x.reshape(B * T, {C})",
            f"w, ids = self.router(h).softmax(-1).topk({k}, dim=-1)",
            "ids = ids.reshape(-1)",
            f"t = h.repeat_interleave({k}, dim=0)",
            "gu = torch.bmm(self.w_gate_up[ids], t.unsqueeze(-1)).squeeze(-1)",
            "g, u = gu.chunk(2, dim=-1)",
            f"y = torch.bmm(self.w_down[ids], ({act('g')} * u).unsqueeze(-1)).squeeze(-1)",
            f"y = (y * w.reshape(-1, 1)).view(B * T, {k}, {C}).sum(dim=1)",
            f"return y.view(B, T, {C})",
        ]
        return cls

    def attention(self, prefix: str, C: int, H: int, T: int, mask: str | None) -> tuple[_Cls, bool]:
        hd = C // H
        kind = self.pick("block", ("attn_fused", "attn_separate"))
        cls = _Cls(f"{prefix}Attn", ["x", "mask"] if mask else ["x"])
        cls.init += [f"self.n_head = {H}", f"self.n_embd = {C}", f"self.hd = {hd}"]
        bias = self.ch.pick((True, False))
        body = cls.body
        body.append(self.ch.pick(("B, T, C = x.size()", "B, T, C = x.shape")))
        per_head = False
        # grouped-query: half as many key/value heads (Llama, Mistral; Phi-3 slices a fused
        # Q|K|V into unequal parts); sdpa with enable_gqa, or K and V repeated by expand
        gqa = H % 2 == 0 and self.flag("attn:gqa", 0.15)
        KV, kvC = (H // 2, C // 2) if gqa else (H, C)
        if kind == "attn_fused" and gqa:
            qkv = self.linear(cls, "c_attn", C, C + 2 * kvC, bias=bias)
            body.append(f"qkv = {qkv('x')}")
            body.append(f"q, k, v = qkv[..., :{C}], qkv[..., {C}:{C + kvC}], qkv[..., {C + kvC}:]")
        elif kind == "attn_fused":
            qkv = self.linear(cls, "c_attn", C, 3 * C, bias=bias)
            body.append(f"qkv = {qkv('x')}")
            per_head = self.flag("attn:qkv_per_head", 0.2)  # GPT-NeoX: [q_h k_h v_h] per head
            if per_head:
                body.append(f"qkv = qkv.view(B, T, {H}, {3 * hd})")
                body.append(self.ch.pick(("q, k, v = qkv.chunk(3, dim=-1)",
                                          "q, k, v = qkv.split(self.hd, dim=-1)")))  # fmt: skip
            else:
                body.append(f"q, k, v = {QKV_SPLITS[self.pick('qkv_split', list(QKV_SPLITS))]}")
        else:
            s = self.ch.pick(LINEARS)
            tie = not gqa and self.flag("trap:tie_qk", 0.12)
            q = self.linear(cls, "query", C, C, bias=bias, spelling=s)
            k = self.linear(cls, "key", C, kvC, bias=bias, spelling=s, tie="query" if tie else None)
            v = self.linear(cls, "value", C, kvC, bias=bias)
            body += [f"q = {q('x')}", f"k = {k('x')}", f"v = {v('x')}"]
        heads = self.pick("heads", list(HEADS))
        perm = self.ch.pick((".transpose(1, 2)", ".permute(0, 2, 1, 3)"))
        for t in "qkv":
            view = t if per_head else HEADS[heads].format(t=t, H=H, hd=hd)
            if gqa and t != "q":
                view = f"{t}.view(B, T, {KV}, {hd})"
            body.append(f"{t} = {view}{perm}")
        if hd % 2 == 0 and self.flag("attn:rotary_interleaved", 0.1):  # GPT-J: torch.stack
            self.helper("rotate_every_two")
            cls.init.append(f'self.register_buffer("angle", torch.rand({T_MAX}, {hd}))')
            body += [
                "cos, sin = self.angle[:T].cos(), self.angle[:T].sin()",
                "q = q * cos + rotate_every_two(q) * sin",
                "k = k * cos + rotate_every_two(k) * sin",
            ]
        if self.flag("attn:qk_norm", 0.1):  # Qwen3: an RMSNorm over each head's features
            body += [
                "q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)",
                "k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)",
            ]
        if hd % 2 == 0 and self.flag("attn:rotary", 0.2):
            self.helper("rotate_half")
            cls.init += [
                f"inv = 1.0 / (10000.0 ** (torch.arange(0, {hd}, 2).double() / {hd}))",
                f"freqs = torch.outer(torch.arange({T_MAX}).double(), inv)",
                "emb = torch.cat((freqs, freqs), dim=-1)",
                'self.register_buffer("cos", emb.cos())',
                'self.register_buffer("sin", emb.sin())',
            ]
            body += [
                "cos, sin = self.cos[:T], self.sin[:T]",
                "q = q * cos + rotate_half(q) * sin",
                "k = k * cos + rotate_half(k) * sin",
            ]
        if self.flag("attn:per_head_scale", 0.15):
            cls.init.append(f"self.head_scale = nn.Parameter(torch.rand({H}, 1, 1) + 0.5)")
            body.append("q = q * self.head_scale")
        bias_terms = []
        if self.flag("attn:alibi", 0.12):
            slopes = [round(2.0 ** -(i + 1), 6) for i in range(H)]
            cls.init.append(
                f'self.register_buffer("slopes", torch.tensor({slopes}).view({H}, 1, 1))'
            )
            body += [
                "pos = torch.arange(T, device=x.device, dtype=x.dtype)",
                "alibi = self.slopes * (pos.view(1, -1) - pos.view(-1, 1))",
            ]
            bias_terms.append("alibi")
        # bmm_folded: fairseq's spelling, heads folded into the batch (B * H, T, hd)
        compute = self.pick("attn", ("matmul", "einsum", "sdpa", "bmm_folded"))
        folded = compute == "bmm_folded"
        if gqa and compute != "sdpa":
            for t in "kv":
                body.append(
                    f"{t} = {t}[:, :, None].expand(B, {KV}, 2, T, {hd}).reshape(B, {H}, T, {hd})"
                )
        causal = self.flag("attn:causal", 0.5)
        probs_out = False
        if compute == "sdpa":
            if mask == "bool" and bias_terms:
                body.append("m = torch.zeros_like(alibi).masked_fill(~mask, float('-inf'))")
                attn_mask: str | None = "m + alibi"
            else:
                attn_mask = " + ".join(bias_terms + (["mask"] if mask else [])) or None
            if attn_mask and causal:  # SDPA takes one or the other: build the causal part
                body.append(
                    "causal = torch.zeros(T, T, dtype=x.dtype, device=x.device).masked_fill("
                    "x.new_ones((T, T), dtype=torch.bool).triu(1), float('-inf'))"
                )
                if mask == "bool" and not bias_terms:
                    attn_mask = "causal.masked_fill(~mask, float('-inf'))"
                else:
                    attn_mask += " + causal"
            args = "q, k, v" + (f", attn_mask={attn_mask}" if attn_mask else "")
            args += ", is_causal=True" if causal and not attn_mask else ""
            args += ", enable_gqa=True" if gqa else ""
            body.append(f"y = F.scaled_dot_product_attention({args})")
        else:
            scale = self.ch.pick((f"(1.0 / math.sqrt({hd}))", "(1.0 / math.sqrt(k.size(-1)))"))
            unfold = folded and bool(bias_terms or mask)  # biases and masks are per head
            if compute == "matmul":
                body.append(f"att = (q @ k.transpose(-2, -1)) * {scale}")
            elif compute == "einsum":
                body.append(f'att = torch.einsum("bhqd,bhkd->bhqk", q, k) * {scale}')
            else:
                body.append(f"q, k, v = (t.reshape(B * {H}, T, {hd}) for t in (q, k, v))")
                body.append(f"att = torch.bmm(q, k.transpose(1, 2)) * {scale}")
                if unfold:
                    body.append(f"att = att.view(B, {H}, T, T)")
            for b in bias_terms:
                body.append(f"att = att + {b}")
            if causal:
                body.append(
                    "att = att.masked_fill(x.new_ones((T, T), dtype=torch.bool).triu(1), "
                    "float('-inf'))"
                )
            if mask == "additive":
                body.append("att = att + mask")
            elif mask == "bool":
                body.append("att = att.masked_fill(~mask, float('-inf'))")
            sm = self.pick("softmax", list(SOFTMAXES))
            if sm == "module":
                cls.init.append("self.softmax = nn.Softmax(dim=-1)")
            body.append(f"att = {SOFTMAXES[sm]}")
            if folded:
                if unfold:
                    body.append(f"att = att.reshape(B * {H}, T, T)")
                body.append(f"y = torch.bmm(att, v).view(B, {H}, T, {hd})")
            else:
                ctx = self.pick("context", ("matmul_op", "torch_matmul", "einsum"))
                body.append(
                    {
                        "matmul_op": "y = att @ v",
                        "torch_matmul": "y = torch.matmul(att, v)",
                        "einsum": 'y = torch.einsum("bhqk,bhkd->bhqd", att, v)',
                    }[ctx]
                )
            probs_out = self.flag("escape:attn_probs", 0.08)
        body.append(f"y = {MERGES[self.pick('merge', list(MERGES))]}")
        out = self.linear(cls, "c_proj", C, C, bias=bias)
        body.append(f"y = {out('y')}")
        body.append("return y, att" if probs_out else "return y")
        return cls, probs_out

    # ------------------------------------------------------------------ the model

    def case(self, tps: Sequence[int]) -> ModelCase:
        ch = self.ch
        tp = self.pick("tp", tps)
        C = self.pick("hidden", (8, 16, 32))
        heads = [h for h in dict.fromkeys((tp, 2 * tp, 4, 8)) if C % h == 0 and h % tp == 0]
        H = ch.pick([h for h in (1, 2) if h % tp] if ch.flag(0.15) else heads)
        if H % tp:
            self.tags.add("heads_indivisible")
        B, T = ch.pick((2, 1, 3)), ch.pick((3, 1, 2, 4, 5, 6))
        F_ = C * ch.pick((4, 1, 2))
        V = ch.pick((16, 13, 24))
        source_kind = self.pick("input", ("x", "ids"))
        mode, call_mode = "train", "train"
        if self.ch.flag(0.2):
            mode, call_mode = self.ch.pick((("train", "eval"), ("eval", "train"), ("eval", "eval")))
            self.tags.add(f"mode:{mode}->{call_mode}")
        allow_eval_sub = (mode, call_mode) != ("eval", "train") and mode == "train"
        n_layers = self.pick("layers", (1, 2))
        layout = [ch.pick(("ffn", "attn+ffn", "attn")) for _ in range(n_layers)]
        has_attn = any("attn" in lay for lay in layout)
        mask = None
        if has_attn and self.ch.flag(0.3):
            mask = self.pick("mask", ("additive", "bool"))

        model = _Cls("Model", [])
        blocks: list[tuple[str, _Cls, list[str], bool]] = []  # (attr, class, subs, extras)
        for i, lay in enumerate(layout):
            blk = _Cls(f"Block{i}", ["x", "mask"] if mask and "attn" in lay else ["x"])
            subs: list[tuple[str, _Cls, bool]] = []
            if "attn" in lay:
                a, extra = self.attention(f"B{i}", C, H, T, mask)
                subs.append(("attn", a, extra))
            if "ffn" in lay:
                before = len(self.model_init)
                f, extra = self.ffn(f"B{i}", C, F_, allow_eval_sub)
                self.model_init[before:] = [
                    s.replace("{path}", f"h{i}.mlp") for s in self.model_init[before:]
                ]
                subs.append(("mlp", f, extra))
            self.classes += [c for _, c, _ in subs]
            residual = self.pick("residual", ("pre_ln", "post_ln", "parallel")[: len(subs) + 1])
            no_grad_block = self.flag("trap:no_grad_block", 0.05) if i == 0 else False
            extras: list[str] = []
            for j, (attr, c, _extra) in enumerate(subs):
                blk.init.append(f"self.ln_{j + 1} = nn.LayerNorm({C})")
                blk.init.append(f"self.{attr} = {c.name}()")
            call_args = {attr: ", mask" if attr == "attn" and mask else "" for attr, _, _ in subs}

            def call(
                attr: str,
                x: str,
                extra: bool,
                blk: _Cls = blk,
                call_args: dict[str, str] = call_args,
                i: int = i,
                extras: list[str] = extras,
            ) -> str:
                res = f"self.{attr}({x}{call_args[attr]})"
                if extra:
                    blk.body.append(f"{attr}_out, {attr}_extra = {res}")
                    extras.append(f'"h{i}.{attr}": {attr}_extra')
                    return f"{attr}_out"
                return res

            body = blk.body
            if residual == "parallel":
                body.append("n = self.ln_1(x)")
                terms = [call(attr, "n", extra) for attr, _, extra in subs]
                if (
                    self.pick("parallel_sum", ("residual_first", "residual_last"))
                    == "residual_first"
                ):
                    body.append(f"x = x + {' + '.join(terms)}")
                else:  # GPT-J: attn_output + feed_forward_hidden_states + residual
                    body.append(f"x = {' + '.join(terms)} + x")
            else:
                for j, (attr, _, extra) in enumerate(subs):
                    ln = f"self.ln_{j + 1}"
                    if no_grad_block and attr == "mlp":
                        start = len(body)
                        inner = call(attr, f"{ln}(x)", extra)  # may write a line itself
                        body[start:] = [
                            "with torch.no_grad():",
                            *("    " + b for b in body[start:]),
                        ]
                        body.append(f"    m = {inner}")
                        body.append("x = x + m")
                    elif residual == "pre_ln":
                        body.append(f"x = x + {call(attr, f'{ln}(x)', extra)}")
                    else:
                        body.append(f"x = {ln}(x + {call(attr, 'x', extra)})")
            body.append(f"return x, {{{', '.join(extras)}}}" if extras else "return x")
            self.classes.append(blk)
            model.init.append(f"self.h{i} = {blk.name}()")
            blocks.append((f"h{i}", blk, [a for a, _, _ in subs], bool(extras)))

        # inputs and the model's forward
        args: list[str] = []
        inputs: list[str] = ["B, T = sizes", "g = torch.Generator().manual_seed(seed)"]
        body = model.body
        if source_kind == "x":
            args.append("x")
            inputs.append(
                f"x = torch.randn(B, T, {C}, generator=g, dtype=torch.float64).requires_grad_()"
            )
        else:
            args.append("idx")
            inputs.append(f"idx = torch.randint(0, {V}, (B, T), generator=g)")
            model.init.insert(0, f"self.wte = nn.Embedding({V}, {C})")
            body.append("x = self.wte(idx)")
        if self.flag("trap:inplace_input", 0.08):
            args.append("shift")
            inputs.append(f"shift = torch.randn(B, T, {C}, generator=g, dtype=torch.float64)")
            body += ["shift.add_(1.0)", "x = x + shift"]
        if mask == "additive":
            args.append("mask")
            inputs.append("mask = torch.randn(B, 1, T, T, generator=g, dtype=torch.float64)")
        elif mask == "bool":
            args.append("mask")
            inputs.append(
                "mask = (torch.rand(B, 1, T, T, generator=g) > 0.4) | "
                "torch.eye(T, dtype=torch.bool)"
            )
        if self.flag("trap:training_branch", 0.08):
            body += ["if self.training:", "    x = x * 2.0"]
        if self.flag("trap:noise", 0.06):  # a random op on a replicated value
            body.append("x = x + 0.01 * torch.randn_like(x)")
        if self.flag("trap:no_grad_side", 0.06):
            model.init.append(f"self.frozen = nn.Linear({C}, {C})")
            body += ["with torch.no_grad():", "    side = self.frozen(x)", "x = x + side"]
        extras_vars = []
        for attr, blk, _subs, has_extras in blocks:
            m = ", mask" if "mask" in blk.args else ""
            if has_extras:
                body.append(f"x, ex_{attr} = self.{attr}(x{m})")
                extras_vars.append(f"ex_{attr}")
            else:
                body.append(f"x = self.{attr}(x{m})")
        if self.flag("trap:autograd_GradReverse_model", 0.04):
            body.append(f"x = {self.helper('GradReverse')}.apply(x)")
        if ch.flag(0.7):
            model.init.append(f"self.ln_f = nn.LayerNorm({C})")
            body.append("x = self.ln_f(x)")
        out_name, loss = "y", False
        head = None
        if source_kind == "ids" and ch.flag(0.7):
            head = self.pick("head", ("untied", "tied_module", "tied_functional", "tied_matmul"))
        elif source_kind == "x" and ch.flag(0.15):
            head = "untied"
            self.tags.add("head:untied")
        if head is not None:
            out_name = "logits"
            if head == "untied":
                lin = self.linear(model, "lm_head", C, V, bias=False)
                body.append(f"logits = {lin('x')}")
            elif head == "tied_module":
                model.init += [
                    f"self.lm_head = nn.Linear({C}, {V}, bias=False)",
                    "self.lm_head.weight = self.wte.weight",
                ]
                body.append("logits = self.lm_head(x)")
            elif head == "tied_functional":
                body.append("logits = F.linear(x, self.wte.weight)")
            else:
                body.append("logits = x @ self.wte.weight.T")
            if ch.flag(0.6):
                loss = True
                kind = self.pick("loss", ("functional", "module", "sum", "flatten"))
                args.append("targets")
                inputs.append(f"targets = torch.randint(0, {V}, (B, T), generator=g)")
                if kind == "functional":
                    body.append(
                        "loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))"
                    )
                elif kind == "module":
                    model.init.append("self.loss_fn = nn.CrossEntropyLoss()")
                    body.append(f"loss = self.loss_fn(logits.view(-1, {V}), targets.view(-1))")
                elif kind == "sum":
                    body.append(
                        f"loss = F.cross_entropy(logits.reshape(-1, {V}), targets.reshape(-1), "
                        "reduction='sum')"
                    )
                else:
                    body.append("loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())")
        else:
            body.append("y = x")
        model.args = args
        inputs.append("inputs = {" + ", ".join(f'"{a}": {a}' for a in args) + "}")

        # hooks on a submodule of block 0
        if self.ch.flag(0.1):
            hook = self.pick("trap:hook", ("fwd", "pre", "fwd_leaf"))
            sub = blocks[0][2][-1]
            if hook == "fwd":
                fn = self.helper("double_output")
                model.init.append(f"self.h0.{sub}.register_forward_hook({fn})")
            elif hook == "fwd_leaf":  # on the block's first nn.Linear: a layer autotp splits
                fn = self.helper("double_output")
                model.init.append(
                    f"next((m for m in self.h0.{sub}.modules() if isinstance(m, nn.Linear)), "
                    f"self.h0.{sub}).register_forward_hook({fn})"
                )
            else:
                fn = self.helper("shift_input")
                model.init.append(f"self.h0.{sub}.register_forward_pre_hook({fn})")
        model.init += self.model_init
        if self.ch.flag(0.15):  # run the parallel module under PyTorch's CommDebugMode
            self.tags.add("tool:comm_debug_mode")

        # the output container
        extras_dict = "{" + ", ".join(f"**{e}" for e in extras_vars) + "}" if extras_vars else None
        leaves = [out_name] + (["loss"] if loss else []) + ([extras_dict] if extras_dict else [])
        container = self.ch.pick(("tuple", "tensor", "dict", "nested", "list", "namedtuple"))
        if container == "tensor" and len(leaves) > 1:
            container = "tuple"
        self.tags.add(f"output:{container}")
        if container == "tensor":
            ret = out_name
        elif container == "tuple":
            ret = ", ".join(leaves) + ("," if len(leaves) == 1 else "")
        elif container == "list":
            ret = "[" + ", ".join(leaves) + "]"
        elif container == "dict":
            ret = (
                "{"
                + ", ".join(
                    [f'"{out_name}": {out_name}']
                    + (['"loss": loss'] if loss else [])
                    + ([f"**{e}" for e in extras_vars])
                )
                + "}"
            )
        elif container == "nested":
            inner = f"[{', '.join(leaves[1:])}]"
            ret = f'{{"out": ({out_name}, {inner}), "n": {T}}}'
        else:
            names = [out_name] + (["loss"] if loss else []) + (["extra"] if extras_dict else [])
            self.helpers.append(f"Out:{names!r}")
            ret = "Out(" + ", ".join(leaves) + ")"
        body.append(f"return {ret}")

        call_sizes = None
        if self.ch.flag(0.3):  # called at other sizes than it was planned with
            call_sizes = (ch.pick((1, 2, 3)), ch.pick((1, 2, 4, 6)))
            self.tags.add("sizes:apart")
            if 1 in (B, *call_sizes):
                self.tags.add("sizes:batch_1")

        parts = ["import collections", "import math", "", "import torch",
                 "import torch.nn as nn", "import torch.nn.functional as F"]  # fmt: skip
        for h in self.helpers:
            if h.startswith("Out:"):
                parts.append(f"\n\nOut = collections.namedtuple('Out', {h[4:]})")
            else:
                parts.append("\n" + HELPERS[h])
        for c in [*self.classes, model]:
            parts.append("\n\n" + c.source())
        source = "\n".join(parts) + "\n"
        self.tags.add(f"tp:{tp}")
        return ModelCase(
            source=source,
            inputs_source="\n".join(inputs) + "\n",
            tp=tp,
            features=frozenset(self.tags),
            mode=mode,
            call_mode=call_mode,
            record=tuple(self.ch.record),
            sizes=(B, T),
            call_sizes=call_sizes,
        )


def generate(ch: Choices, tps: Sequence[int] = TPS) -> ModelCase:
    """One case, every decision read from `ch`."""
    return _Gen(ch).case(tps)


def model_cases(tps: Sequence[int] = TPS) -> SearchStrategy[ModelCase]:
    """A hypothesis strategy of ModelCase; shrinks towards the simplest structures."""
    from hypothesis import strategies as st

    @st.composite
    def case(draw: st.DrawFn) -> ModelCase:
        return generate(_HypothesisChoices(draw), tps)

    return case()


def random_case(seed: int, tps: Sequence[int] = TPS) -> ModelCase:
    """The case random.Random(seed) draws (deterministic)."""
    return generate(Choices(random.Random(seed)), tps)


def shrink(
    case: ModelCase,
    keep: Callable[[ModelCase], bool],
    tps: Sequence[int] = TPS,
    budget: int = 200,
) -> ModelCase:
    """A smaller case for which `keep` still holds: decisions set to their simplest option
    one at a time (the rest replayed), kept when `keep` holds and the source is no longer.
    At most `budget` calls of `keep`."""
    best, calls, changed = case, 0, True
    while changed and calls < budget:
        changed = False
        for i in range(len(best.record)):
            if i >= len(best.record) or best.record[i] == 0 or calls >= budget:
                continue
            trial = list(best.record)
            trial[i] = 0
            cand = generate(Choices(replay=trial), tps)
            if cand.source == best.source and cand.inputs_source == best.inputs_source:
                best = cand  # a decision that changed nothing visible
                continue
            if len(cand.source) > len(best.source):
                continue
            calls += 1
            if keep(cand):
                best, changed = cand, True
    return best
