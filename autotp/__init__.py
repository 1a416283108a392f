"""autotp: automatic Megatron-style tensor parallelism for unmodified PyTorch models.

    plan = autotp.plan(model, tp=8)             # what parallelize runs: what splits, where
    module = autotp.parallelize(model, tp=8)    # this rank's module (torch.distributed)
    sim = autotp.simulate(model, tp=8)          # all ranks in one process, for checking

The pipeline, one module per stage: trace -> match -> sharding (propagation) -> rewrite ->
materialise; collectives holds f and g; render draws plans in the terminal.
"""

from .comm import count_collectives
from .errors import AutoTPError
from .parallel import full_grads, full_state_dict, parallelize, plan, simulate
from .plan import Plan
from .regions import RegionPlan
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
