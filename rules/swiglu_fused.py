"""The gated MLP with one fused gate|up projection, halved by chunk or split.

    x -> [gate_up] -> chunk(2) -> gate, up -> silu(gate) * up -> [down] -> y      serial
    f(x) -> [gate_up_r] -> chunk(2) -> gate_r, up_r -> silu(gate_r) * up_r
         -> [down_r] -> g -> y                                                    rank r

The fused weight's output is two blocks [gate | up]. A contiguous column split would give
rank 0 all of gate and rank 1 all of up, so each block is split alike and the rank's
pieces concatenated: rank r holds [gate_r | up_r], its chunk(2) halves pair the same
features, and `down` is split by input features with one all-reduce after it.
Motivated by Phi-3's `mlp.gate_up_proj` and ModernBERT's `mlp.Wi` (then `chunk(2)`).
"""

from autotp.rule import Column, Rule, pattern, row

_HALVES = {"chunk", "split"}


def _halves_its_output(m, ctx) -> bool:
    """The fused output goes only to one chunk/split into two equal parts."""
    fused = m.layers["gate_up"].node
    users = list(fused.users)
    if len(users) != 1:
        return False
    (cut,) = users
    from autotp import ops

    if ops.op_name(cut, ctx.gm) not in _HALVES:
        return False
    parts = cut.args[1] if len(cut.args) > 1 else cut.kwargs.get("chunks", cut.kwargs.get(
        "split_size_or_sections", cut.kwargs.get("split_size")))  # fmt: skip
    dim = cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0)
    val = fused.meta.get("val")
    if val is None or dim not in (-1, val.dim() - 1):
        return False  # halves of the features, not of the batch or the sequence
    if ops.op_name(cut, ctx.gm) == "chunk":
        return parts == 2
    return isinstance(parts, int) and 2 * parts == val.shape[-1]  # split(width // 2)


RULE = Rule(
    name="swiglu_fused",
    patterns=(
        pattern(
            {"gate_up": "linear", "act": "glue", "down": "linear"},
            [("gate_up", "act", None), ("act", "down", 0)],
        ),
    ),
    split={"gate_up": Column(blocks=2), "down": row},
    motivation="Phi-3 mlp.gate_up_proj -> chunk(2) -> silu(gate) * up -> mlp.down_proj",
    accept=_halves_its_output,
)
