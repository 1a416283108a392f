"""Dropout with Megatron's random streams, on torch.Generator (CPU and GPU alike).

Two streams per rank: a *shared* one, seeded the same on every TP rank, for dropout on
replicated values (so they stay bitwise identical across ranks), and a *rank* one, seeded
differently on each rank, for dropout inside split regions (each rank masks its own
shard independently, as serial dropout would mask the whole). Megatron's tracker is
CUDA-only; this one is not. Which stream a dropout uses is decided by the placement of
its input (sharding/); the rewrite gives each dropout call site a module of its own under
`tp_dropout_shared` or `tp_dropout_rank`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RankRandom", "StreamDropout"]


class RankRandom:
    """The generators of one rank, created per device on first use."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank
        self._gens: dict[tuple[str, torch.device], torch.Generator] = {}

    def stream_seed(self, stream: str) -> int:
        if stream == "shared":
            return self.seed % 2**63
        return (self.seed * 1_000_003 + 7_919 * (self.rank + 1)) % 2**63

    def generator(self, stream: str, device: torch.device) -> torch.Generator:
        key = (stream, device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self.stream_seed(stream))
        return self._gens[key]

    def get_state(self) -> dict[tuple[str, torch.device], torch.Tensor]:
        return {k: g.get_state() for k, g in self._gens.items()}

    def set_state(self, state: dict[tuple[str, torch.device], torch.Tensor]) -> None:
        for (stream, device), s in state.items():
            self.generator(stream, device).set_state(s)


class StreamDropout(nn.Module):
    """Dropout drawing its mask from one stream of a RankRandom; follows train()/eval()."""

    def __init__(self, random: RankRandom, stream: str) -> None:
        super().__init__()
        self.random, self.stream = random, stream

    def forward(self, x: torch.Tensor, p: float, training: bool | None = None) -> torch.Tensor:
        """`training` given: a functional dropout's own flag; None: this module's mode."""
        if not (self.training if training is None else training) or p == 0.0:
            return x
        if p == 1.0:
            return x * 0.0
        gen = self.random.generator(self.stream, x.device)
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen)
        return x * keep / (1.0 - p)

    def extra_repr(self) -> str:
        return f"stream={self.stream}"
