"""Stage 4, rewrite: the per-rank graph, the same on every rank.

graph.py     f and g inserted, split linears in their local form, shape constants
             rewritten, the embedding and the loss in their vocabulary-parallel form
sequence.py  sequence parallelism's own steps (gathers, norms on the split sequence)
sites.py     the call sites of collectives and dropout, and the record each node keeps
guards.py    size guards: a proof that read a size holds only for that size

Takes the graph and the placements of sharding; gives the rank graph and its sites.
"""
