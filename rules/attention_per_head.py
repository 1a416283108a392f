"""Self-attention with a fused projection laid out per head: [q_h k_h v_h] for each head h.

    x -> [qkv] -> view(B, T, H, 3 hd) -> split(hd) / chunk(3) -> q, k, v -> attention
      -> merge -> [out]                                                         serial
    f(x) -> [qkv_r] -> view(B, T, H/tp, 3 hd) -> ... -> [out_r] -> g            rank r

Each head's q, k and v are adjacent in the fused weight's output, so a plain column split
gives rank r whole heads (all of their q, k and v), unlike GPT-2's [Q | K | V] parts. The
view that exposes the heads is the first thing to read the fused output; its head count
becomes H/tp (propagation decides, from where the split lands). `out` is row-split.
Motivated by GPT-NeoX's and Pythia's `attention.query_key_value` (then
`view(..., -1, 3 * head_size)` and `chunk(3, dim=-1)`) and BLOOM's `self_attention.query_key_value`.
"""

from autotp.match import Context, Match, Rule, column, ops, row

from .attention_fused import EXPLICIT, SDPA

_VIEWS = {"view"}


def _viewed_per_head(m: Match, ctx: Context) -> bool:
    """The fused output is read only by views that keep the batch and sequence and cut the
    features into heads: the per-head layout (GPT-2's parts are split first)."""
    fused = m.layers["qkv"].node
    out = fused.meta.get("val")
    users = list(fused.users)
    if out is None or not users:
        return False
    for u in users:
        v = u.meta.get("val")
        if ops.op_name(u, ctx.gm) not in _VIEWS or v is None:
            return False
        if v.dim() <= out.dim() or tuple(v.shape[: out.dim() - 1]) != tuple(out.shape[:-1]):
            return False  # not (..., heads, per-head features)
        new = tuple(v.shape[out.dim() - 1 :])
        if len(new) >= 3 and new[0] == 3 and new[1] != 3:
            return False  # (..., 3, heads, head_dim): [Q | K | V] parts (ModernBERT)
    return True


RULE = Rule(
    name="attention_per_head_qkv",
    patterns=(EXPLICIT, SDPA),
    split={"qkv": column, "out": row},
    motivation="GPT-NeoX attention.query_key_value (q, k, v adjacent per head) -> dense",
    accept=_viewed_per_head,
)
