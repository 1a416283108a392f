"""Self-attention with a fused Q|K|V projection, split by heads.

    x -> [c_attn] -> split(C) -> q, k, v -> heads -> softmax(q k^T) v -> merge -> [c_proj]

The fused weight's output is three parts [Q | K | V]. A contiguous column split would
give rank 0 all of Q, so each part is split by heads and the
rank's pieces concatenated: rank r holds [Q_r | K_r | V_r] and the graph's `split(C)`
becomes `split(C/tp)` (decided by propagation, not by this rule). Attention per head is
independent; `c_proj` is row-split and followed by one all-reduce.
Two spellings: explicit matmul-softmax-matmul, and F.scaled_dot_product_attention.
Motivated by nanoGPT/GPT-2's `attn.c_attn` and `attn.c_proj`.
"""

from autotp.match import Column, Rule, pattern, row

EXPLICIT = pattern(
    {
        "qkv": "linear", "heads": "glue", "scores": "matmul", "probs": "glue",
        "context": "matmul", "merge": "glue", "out": "linear",
    },
    [
        ("qkv", "heads", None), ("heads", "scores", 0), ("heads", "scores", 1),
        ("scores", "probs", None), ("probs", "context", 0), ("heads", "context", 1),
        ("context", "merge", None), ("merge", "out", 0),
    ],
)  # fmt: skip

SDPA = pattern(
    {"qkv": "linear", "heads": "glue", "attn": "sdpa", "merge": "glue", "out": "linear"},
    [
        ("qkv", "heads", None), ("heads", "attn", 0), ("heads", "attn", 1),
        ("heads", "attn", 2), ("attn", "merge", None), ("merge", "out", 0),
    ],
)  # fmt: skip

RULE = Rule(
    name="attention_fused_qkv",
    patterns=(EXPLICIT, SDPA),
    split={"qkv": Column(parts=3), "out": row},
    motivation="GPT-2 attn.c_attn (fused Q|K|V) -> attention -> attn.c_proj",
)
