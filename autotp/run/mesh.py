"""The 2-D process mesh of the runner: TP groups of consecutive ranks, data parallel across
them (the paper's 8-way TP x 64-way DP: a TP group inside a node)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..errors import AutoTPError

__all__ = ["Mesh", "make_mesh"]


@dataclass(frozen=True)
class Mesh:
    rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup


def make_mesh(tp: int, dp: int) -> Mesh:
    """Groups for a world of tp x dp ranks: rank = dp_rank * tp + tp_rank. Every rank
    creates every group, as torch.distributed requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp * dp != world:
        raise AutoTPError(
            f"--tp {tp} x --dp {dp} = {tp * dp} ranks, but {world} processes were started: "
            f"start tp x dp processes (torchrun --nproc-per-node), or change --tp/--dp"
        )
    tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(dp)]
    dp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    tp_rank, dp_rank = rank % tp, rank // tp
    return Mesh(rank, tp, dp, tp_rank, dp_rank, tp_groups[dp_rank], dp_groups[tp_rank])
