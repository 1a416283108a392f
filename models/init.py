"""Initialisation one parameter at a time: each tensor is filled from its own generator,
seeded by (model seed, parameter name), so any process can make any single parameter
exactly as the whole model would be made, with no other parameter in memory (autotp's
trainer builds models on the meta device and materialises one shard at a time)."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["fresh_seed", "seeded_normal_", "param_generator"]


def fresh_seed() -> int:
    """A model seed drawn from torch's global generator (so torch.manual_seed decides it)."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())


def param_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def seeded_normal_(t: torch.Tensor, std: float, seed: int, name: str) -> torch.Tensor:
    """Fill `t` with N(0, std^2) drawn from the (seed, name) generator; no-op on meta."""
    if t.is_meta:
        return t
    draw = torch.empty(t.shape, dtype=torch.float32).normal_(
        0.0, std, generator=param_generator(seed, name)
    )
    return t.copy_(draw.to(t.dtype))
