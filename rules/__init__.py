"""The rules autotp applies, one structure per file. `DEFAULT_RULES` is the one list.

Order matters: a linear is claimed by the first rule that matches it, so the larger
attention structures come before the MLP.
"""

from autotp.rule import Rule

from . import attention_fused, attention_separate, mlp

DEFAULT_RULES: tuple[Rule, ...] = (
    attention_fused.RULE,
    attention_separate.RULE,
    mlp.RULE,
)

__all__ = ["DEFAULT_RULES"]
