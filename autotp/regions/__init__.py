"""The region form: a model that keeps its own Python (a transformers model), with its
regions (decoder layers, input embedding, output head) each planned by the stages below
and replaced by its parallel module.

form.py     plan_regions and build_regions: one traced, proven graph per way a region is
            called (a call pattern), planned once per program
module.py   the parallel region module: picks a pattern's graph per call, plans a new one
state.py    what a user may change of a parallel region (hooks, attributes, modes)
tensors.py  each rank's shards of a region; the rest loaded; the serial view

Takes a model and tp; gives a RegionPlan and, per rank, the model with its regions
replaced.
"""
