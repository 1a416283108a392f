"""Stage 5, build: a rank's module from a plan, over tensors of its own.

materialise.py  a rank's module: the rank graph with its sites wired, its shards cut from
                the serial weights (or read from files); the user's model only read
weights.py      safetensors read slice by slice (weights=); buffers no file holds
dcp_shards.py   how a split tensor describes itself to torch.distributed.checkpoint
simulate.py     every rank built and run in one process (simulate)

Takes a plan, a rank and the weights; gives an nn.Module.
"""
