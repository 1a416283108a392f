"""The input embedding split along the vocabulary.

    ids -> wte[ids]                                              serial
    ids -> (ids in my range ? wte_r[ids - start] : 0) -> g       rank r

Rank r holds rows [r*V/tp, (r+1)*V/tp) of the (padded) table, looks up the ids in its
range, writes zeros for the others, and one all-reduce sums the rows. Only the token
embedding is split: an embedding is taken when an output layer over the same vocabulary
was (tied or untied), or when the model declares it its vocabulary table (a
transformers model's input embedding, planned as a region of its own); position and
token-type tables stay replicated.
Motivated by GPT-2's `transformer.wte` and BERT's `word_embeddings`.
"""

from typing import cast

from autotp.match import Context, EmbeddingInfo, LinearInfo, Match, Rule, pattern, vocab


def _same_vocabulary_as_a_head(m: Match, ctx: Context) -> bool:
    """A head over its vocabulary was taken, or the model declares it its input table."""
    emb = cast(EmbeddingInfo, m.layers["table"])  # its pattern node is an "embedding"
    if emb.weight in ctx.tables:
        return True
    heads = [cast(LinearInfo, mm.layers["head"])  # lm_head's head is a "linear"
             for mm in ctx.accepted if mm.rule.name == "lm_head"]  # fmt: skip
    tied = {id(ctx.gm.get_parameter(h.weight)) for h in heads}
    return any(h.out_features == emb.num_embeddings for h in heads) or (
        id(ctx.gm.get_parameter(emb.weight)) in tied
    )


RULE = Rule(
    name="vocab_embedding",
    patterns=(pattern({"table": "embedding"}, []),),
    split={"table": vocab},
    motivation="GPT-2 transformer.wte, BERT bert.embeddings.word_embeddings",
    accept=_same_vocabulary_as_a_head,
)
