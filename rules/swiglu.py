"""The gated MLP (SwiGLU): two column-split linears joined elementwise, a row-split one.

    x -> [gate_proj] -> silu --\\
    x -> [up_proj] ------------ * -> [down_proj] -> y            serial
    f(x) -> gate_r, up_r -> silu(gate_r) * up_r -> [down_r] -> g -> y     rank r

gate and up split their output features alike, so the elementwise product pairs the same
features on every rank with no communication; down is split by input features and one
all-reduce completes it. gate and up read one shared f.
Motivated by Llama's `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`.
"""

from autotp.match import Rule, column, pattern, row

RULE = Rule(
    name="swiglu",
    patterns=(
        pattern(
            {"gate": "linear", "up": "linear", "act": ("glue", 2), "down": "linear"},
            [("gate", "act", None), ("up", "act", None), ("act", "down", 0)],
        ),
    ),
    split={"gate": column, "up": column, "down": row},
    motivation="Llama mlp.gate_proj, mlp.up_proj -> silu(gate) * up -> mlp.down_proj",
)
