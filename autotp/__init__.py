"""autotp: automatic Megatron-style tensor parallelism for unmodified PyTorch models.

    plan = autotp.plan(model, tp=8)             # what parallelize runs: what splits, where
    module = autotp.parallelize(model, tp=8)    # this rank's module (torch.distributed)
    sim = autotp.simulate(model, tp=8)          # all ranks in one process, for checking

The pipeline, one package per stage: capture -> match -> sharding -> rewrite -> build;
runtime holds f and g, show draws plans in the terminal, regions plans and builds a model
that keeps its own Python by regions (docs/architecture.md).
"""

from .common.errors import AutoTPError
from .parallel import full_grads, full_state_dict, parallelize, plan, simulate
from .planning.plan import Plan
from .planning.region_plan import RegionPlan
from .runtime.comm import count_collectives
from .sharding import VocabOptions

__all__ = [
    "AutoTPError",
    "Plan",
    "count_collectives",
    "full_grads",
    "full_state_dict",
    "parallelize",
    "plan",
    "RegionPlan",
    "simulate",
    "VocabOptions",
]
__version__ = "0.1.0"
