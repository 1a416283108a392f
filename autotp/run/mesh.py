"""The 2-D process mesh of the runner: TP groups of consecutive ranks, data parallel across
them (the paper's 8-way TP x 64-way DP: a TP group inside a node).

PyTorch's own DeviceMesh with named dimensions ("dp", "tp"): rank = dp_rank * tp + tp_rank,
so a TP group is one row of the mesh. `mesh.tp_group` runs the rewritten graph's
collectives, `mesh.device["dp"]` is what FSDP2 (fully_shard) and replicate work over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..common.errors import AutoTPError

__all__ = ["Mesh", "make_mesh"]


@dataclass(frozen=True)
class Mesh:
    rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    device: DeviceMesh  # dims ("dp", "tp")

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.device["tp"].get_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.device["dp"].get_group()


def make_mesh(tp: int, dp: int) -> Mesh:
    """The ("dp", "tp") mesh of a world of tp x dp ranks; every rank calls it, as
    torch.distributed requires of every group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp * dp != world:
        raise AutoTPError(
            f"--tp {tp} x --dp {dp} = {tp * dp} ranks, but {world} processes were started: "
            f"start tp x dp processes (torchrun --nproc-per-node), or change --tp/--dp"
        )
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = init_device_mesh(kind, (dp, tp), mesh_dim_names=("dp", "tp"))
    tp_rank, dp_rank = device.get_local_rank("tp"), device.get_local_rank("dp")
    if rank != dp_rank * tp + tp_rank:  # the layout the checkpoints and data order assume
        raise AutoTPError(f"rank {rank} sits at dp {dp_rank}, tp {tp_rank} of the mesh")
    return Mesh(rank, tp, dp, tp_rank, dp_rank, device)
