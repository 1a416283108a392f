"""The gated MLP with one fused gate|up projection, halved by chunk or split.

    x -> [gate_up] -> chunk(2) -> gate, up -> silu(gate) * up -> [down] -> y      serial
    f(x) -> [gate_up_r] -> chunk(2) -> gate_r, up_r -> silu(gate_r) * up_r
         -> [down_r] -> g -> y                                                    rank r

The fused weight's output is two parts [gate | up]. A contiguous column split would give
rank 0 all of gate and rank 1 all of up, so each part is split alike and the rank's
pieces concatenated: rank r holds [gate_r | up_r], its chunk(2) halves pair the same
features, and `down` is split by input features with one all-reduce after it.
Motivated by Phi-3's `mlp.gate_up_proj` and ModernBERT's `mlp.Wi` (then `chunk(2)`); the
same shape holds for routed experts (`gate_up_proj[ids]`, Mixtral and Qwen MoE), split
along each expert's hidden features with the router replicated.
"""

from autotp.match import Column, Context, Match, Rule, canonical, ops, pattern, row


def _halves_its_output(m: Match, ctx: Context) -> bool:
    """The fused output goes only to one chunk/split into two equal halves of its features
    (after a squeeze of a routed expert's trailing dimension, where there is one)."""
    cut = m.layers["gate_up"].node
    while True:
        users = list(cut.users)
        if len(users) != 1:
            return False
        value, (cut,) = cut, users
        if ops.op_name(cut, ctx.gm) != "squeeze":
            break
    call = canonical(cut, ctx.gm)
    val = value.meta.get("val")
    if call.op not in ("chunk", "split") or val is None or call["dim"] != val.dim() - 1:
        return False  # halves of the features, not of the batch or the sequence
    if call.op == "chunk":
        chunks: object = call["chunks"]
        return chunks == 2
    half = call["split_size"]
    return isinstance(half, int) and 2 * half == val.shape[-1]  # split(width // 2)


RULE = Rule(
    name="swiglu_fused",
    patterns=(
        pattern(
            {"gate_up": "linear", "act": "glue", "down": "linear"},
            [("gate_up", "act", None), ("act", "down", 0)],
        ),
    ),
    split={"gate_up": Column(parts=2), "down": row},
    motivation="Phi-3 mlp.gate_up_proj -> chunk(2) -> silu(gate) * up -> mlp.down_proj",
    accept=_halves_its_output,
)
