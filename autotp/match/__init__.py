"""Stage 2, match: the traced graph in a normalised op vocabulary, and each rule's pattern
found in it. This package is also what a rule file imports (`rules/`, docs/rules.md):

    from autotp.match import Rule, column, pattern, row

ops.py       the normalised op vocabulary (every spelling of gelu is `gelu`, of a
             reshape `view`)
call.py      each op call read once into a record: op name, arguments by name
rule.py      what a rule is: patterns plus a declarative split (column, row, vocab)
patterns.py  linears and embeddings in any spelling; networkx matching of rule patterns

Takes the captured GraphModule and the rules; gives the matched blocks (one per rule
instance) with the linears each splits.
"""

from . import ops
from .call import Call, canonical
from .patterns import Context, EmbeddingInfo, LinearInfo, Match, activations, find_linears
from .rule import Column, Row, Rule, Split, Vocab, column, pattern, row, vocab

__all__ = [
    "ops", "Call", "canonical", "Context", "Match", "LinearInfo", "EmbeddingInfo", "activations",
    "find_linears",
    "Column", "Row", "Rule", "Split", "Vocab", "column", "pattern", "row", "vocab",
]  # fmt: skip
