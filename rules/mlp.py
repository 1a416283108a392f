"""The Megatron MLP: a column-split linear, an activation, a row-split linear.

    x -> [c_fc] -> gelu -> [c_proj] -> y          serial
    f(x) -> [c_fc_r] -> gelu -> [c_proj_r] -> g -> + b -> y      rank r

`c_fc`'s output features are split, so GeLU (elementwise) runs on a shard with no
communication; `c_proj` is split by input features and produces a partial sum that one
all-reduce (g) completes; its bias is added after. The activation may be any elementwise
region with a single input (GeLU in any spelling, ReLU, the tanh formula...).
Motivated by GPT-2's `mlp.c_fc`/`mlp.c_proj` and BERT's `intermediate`/`output.dense`.
"""

from autotp.match import Rule, column, pattern, row

RULE = Rule(
    name="mlp",
    patterns=(
        pattern(
            {"fc": "linear", "act": ("glue", 1), "proj": "linear"},
            [("fc", "act", None), ("act", "proj", 0)],
        ),
    ),
    split={"fc": column, "proj": row},
    motivation="GPT-2 mlp.c_fc -> gelu -> mlp.c_proj; BERT intermediate -> output",
)
