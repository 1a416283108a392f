"""What runs on a rank: the collectives and the state a parallel module needs while it
trains, with no knowledge of graphs or plans.

comm.py              communicators (a process group, tp=1, all ranks in one process) and
                     the custom ops torch.compile sees; count_collectives
collectives.py       f, g, all-reduce max, gather and the sequence-parallel three as
                     autograd functions, and their in-process versions
collective_kinds.py  each kind of collective site declared once: its module, its record
                     names, what it runs, its in-process version (every other stage reads it)
vocab.py             the split embedding lookup and the vocabulary-parallel cross-entropy
random.py            dropout streams: shared by the tensor-parallel ranks, or one per rank
grads.py             gradient norms over split and replicated parameters
handover.py          HandedOver: a hidden state passed from layer to layer split along the
                     sequence, gathered where the model's own Python reads it
agree.py             what the ranks must agree on (random state, inputs), checked once

Takes tensors and process groups; gives the parts the rewrite inserts and the build wires.
"""
