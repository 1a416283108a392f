"""Self-attention with a fused Q|K|V projection sliced into parts of unequal widths.

    x -> [qkv] -> qkv[..., :q] -> heads -> q  \\
               -> qkv[..., q:q+kv] -> heads -> k   > attention -> merge -> [out]
               -> qkv[..., q+kv:]  -> heads -> v  /                            serial
    f(x) -> [qkv_r] -> qkv_r[..., :q/tp], [q/tp:(q+kv)/tp], [(q+kv)/tp:] -> ...
         -> [out_r] -> g                                                       rank r

With grouped-query attention the K and V parts are narrower than Q, so GPT-2's three
equal parts do not fit: each part is split by heads and the rank's pieces concatenated,
[Q_r | K_r | V_r], and the slices' bounds become the local ones (propagation finds the
parts from the slices and rewrites them). `out` is row-split. With fewer key/value heads
than ranks, the K and V parts are held by the ranks whose query heads read each head
(as in attention_separate), the Q part still split over all ranks.
Motivated by Phi-3's `self_attn.qkv_proj`, sliced at `query_pos` and
`query_pos + num_key_value_heads * head_dim`.
"""

from autotp.match import Column, Context, Match, Rule, Split, ops, pattern, row

_HEADS = {
    "qkv": "linear", "q_heads": "glue", "k_heads": "glue", "v_heads": "glue",
    "merge": "glue", "out": "linear",
}  # fmt: skip
_SLICES = [("qkv", "q_heads", None), ("qkv", "k_heads", None), ("qkv", "v_heads", None)]

EXPLICIT = pattern(
    {**_HEADS, "scores": "matmul", "probs": "glue", "context": "matmul"},
    [
        *_SLICES, ("q_heads", "scores", 0), ("k_heads", "scores", 1), ("scores", "probs", None),
        ("probs", "context", 0), ("v_heads", "context", 1), ("context", "merge", None),
        ("merge", "out", 0),
    ],
)  # fmt: skip

SDPA = pattern(
    {**_HEADS, "attn": "sdpa"},
    [
        *_SLICES, ("q_heads", "attn", 0), ("k_heads", "attn", 1), ("v_heads", "attn", 2),
        ("attn", "merge", None), ("merge", "out", 0),
    ],
)  # fmt: skip


def _sliced_three_ways(m: Match, ctx: Context) -> bool:
    """The fused output is read by exactly three slices (which of its features each takes
    is checked by propagation)."""
    users = list(m.layers["qkv"].node.users)
    return len(users) == 3 and all(ops.op_name(u, ctx.gm) in ("getitem", "slice") for u in users)


# fewer key/value heads than ranks: the query part split over all ranks, each key/value
# head held by the ranks whose query heads read it (their gradients summed), or else the
# key and value parts whole on every rank (Megatron's choice)
_KV_SHARED: tuple[dict[str, Split], ...] = tuple(
    {"qkv": Column(parts=3, part_replicas=(1, g, g)), "out": row} for g in (2, 4, 8, 16, 32)
)

RULE = Rule(
    name="attention_sliced_qkv",
    patterns=(EXPLICIT, SDPA),
    split={"qkv": Column(parts=3), "out": row},
    fallback=_KV_SHARED,
    motivation="Phi-3 self_attn.qkv_proj -> [:q], [q:q+kv], [q+kv:] -> attention -> o_proj",
    accept=_sliced_three_ways,
)
