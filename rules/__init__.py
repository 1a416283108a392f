"""The rules autotp applies, one structure per file. `DEFAULT_RULES` is the one list.

Order matters: a layer is claimed by the first rule that matches it, so the larger
attention structures come before the MLP, and the output layer before the input embedding
(which is split only when an output layer over its vocabulary was).
"""

from autotp.match import Rule

from . import (
    attention_fused,
    attention_per_head,
    attention_separate,
    attention_sliced,
    lm_head,
    mlp,
    swiglu,
    swiglu_fused,
    vocab_embedding,
)

DEFAULT_RULES: tuple[Rule, ...] = (
    attention_per_head.RULE,  # before attention_fused: the same shape, heads viewed first
    attention_fused.RULE,
    attention_separate.RULE,
    attention_sliced.RULE,
    swiglu.RULE,
    swiglu_fused.RULE,  # before mlp: the same linear -> glue -> linear shape, halved
    mlp.RULE,
    lm_head.RULE,
    vocab_embedding.RULE,
)

__all__ = ["DEFAULT_RULES"]
