"""Self-attention with separate Q, K and V projections, split by heads.

    x -> [query] -> heads -> q  \\
    x -> [key]   -> heads -> k   > softmax(q k^T + mask) v -> merge -> [dense]
    x -> [value] -> heads -> v  /

Q, K and V are column-split (rank r owns heads r*h/tp ... (r+1)*h/tp - 1); the three read
the same input through one shared f. The output projection is row-split, followed by one
all-reduce. The score region may take further inputs (an attention mask). With fewer
key/value heads than ranks (grouped-query attention at large tp), each key/value head is held
by the ranks whose query heads read it (each rank computes only those; the ranks sharing
one sum their weight gradients), else whole on every rank.
Two spellings: explicit matmul-softmax-matmul, and F.scaled_dot_product_attention.
Motivated by BERT's `attention.self.query/key/value` and `attention.output.dense`.
"""

from autotp.match import Column, Rule, Split, column, pattern, row

EXPLICIT = pattern(
    {
        "q": "linear", "k": "linear", "v": "linear",
        "q_heads": "glue", "k_heads": "glue", "v_heads": "glue",
        "scores": "matmul", "probs": "glue", "context": "matmul", "merge": "glue",
        "out": "linear",
    },
    [
        ("q", "q_heads", None), ("k", "k_heads", None), ("v", "v_heads", None),
        ("q_heads", "scores", 0), ("k_heads", "scores", 1), ("scores", "probs", None),
        ("probs", "context", 0), ("v_heads", "context", 1), ("context", "merge", None),
        ("merge", "out", 0),
    ],
)  # fmt: skip

SDPA = pattern(
    {
        "q": "linear", "k": "linear", "v": "linear",
        "q_heads": "glue", "k_heads": "glue", "v_heads": "glue",
        "attn": "sdpa", "merge": "glue", "out": "linear",
    },
    [
        ("q", "q_heads", None), ("k", "k_heads", None), ("v", "v_heads", None),
        ("q_heads", "attn", 0), ("k_heads", "attn", 1), ("v_heads", "attn", 2),
        ("attn", "merge", None), ("merge", "out", 0),
    ],
)  # fmt: skip

# fewer key/value heads than ranks: each key/value head is held by the ranks whose
# query heads read it (their gradients summed), or else K and V stay whole on every
# rank (Megatron's choice) and each rank's attention reads the heads its queries use
_KV_SHARED: tuple[dict[str, Split], ...] = tuple(
    {"q": column, "k": Column(replicas=g), "v": Column(replicas=g), "out": row}
    for g in (2, 4, 8, 16, 32)
)

RULE = Rule(
    name="attention_separate_qkv",
    patterns=(EXPLICIT, SDPA),
    split={"q": column, "k": column, "v": column, "out": row},
    fallback=(*_KV_SHARED, {"q": column, "out": row}),
    motivation="BERT attention.self.query/key/value -> attention -> attention.output.dense",
)
