"""The output layer split along the vocabulary (logits per vocabulary slice).

    h -> [lm_head] -> logits -> cross_entropy(logits, targets)      serial
    f(h) -> [lm_head_r] -> logits_r -> vocab-parallel cross-entropy   rank r

Rank r computes logits for its slice of the (padded) vocabulary. When the loss is in the
graph, propagation replaces it by the vocab-parallel cross-entropy: all-reduces of the
row max, the target logit and the sum of exponentials, batch x seq numbers each; the logits
are never gathered. Logits the model returns are gathered (or kept local on request).
The weight may be tied to the input embedding: the same shard serves both.
An output layer is recognised by what it feeds (a cross-entropy, or the model's output)
and by its width: a cross-entropy's classes, or the rows of an embedding in the graph.
Motivated by GPT-2's `lm_head` and BERT's `cls.predictions.decoder`.
"""

from autotp.match import Context, Match
from autotp.rule import Rule, pattern, vocab


def _over_a_vocabulary(m: Match, ctx: Context) -> bool:
    rows = {e.num_embeddings for e in ctx.embeddings.values()}
    return "loss" in m.nodes or m.layers["head"].out_features in rows


RULE = Rule(
    name="lm_head",
    patterns=(
        pattern({"head": "linear", "loss": "cross_entropy"}, [("head", "loss", 0)]),
        pattern(
            {"head": "linear", "logits": "glue", "loss": "cross_entropy"},
            [("head", "logits", None), ("logits", "loss", 0)],
        ),
        pattern({"head": "linear", "out": "output"}, [("head", "out", None)]),
        pattern(
            {"head": "linear", "logits": "glue", "out": "output"},
            [("head", "logits", None), ("logits", "out", None)],
        ),
    ),
    split={"head": vocab},
    motivation="GPT-2 lm_head (tied to wte), BERT cls.predictions.decoder (tied)",
    accept=_over_a_vocabulary,
)
