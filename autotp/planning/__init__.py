"""The pipeline short of weights: capture, match, sharding and rewrite run in order, and
the result kept as a plan.

plan.py         plan_graph and Plan: one traced graph planned (the whole-graph form)
region_plan.py  RegionPlan: a model that keeps its own Python, planned by regions (a
                transformers model's layers, its embedding and its head)
cache.py        region plans kept on disk under a digest of the program they plan

Takes a model (real or on the meta device) and tp; gives a plan, the same on every rank,
that prints, counts its collectives and has a fingerprint.
"""
