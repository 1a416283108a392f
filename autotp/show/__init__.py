"""Showing a plan: the facts first, then their views.

report.py  placements, bytes per rank, communication per step: plain data (also --json)
render.py  the views in the terminal (rich): summary tree, graph, diff, unmatched, errors
shown.py   what the views read of a plan (protocols Plan and RegionPlan satisfy: show
           sits below planning and does not import it)

Takes a plan; gives text. Nothing here changes a plan.
"""
