"""The runner on PyTorch's own data parallelism: `--fsdp` (FSDP2's fully_shard over the
mesh's "dp" dimension, on each rank's TP module) trains as the serial model does, and its
checkpoints resume exactly, also without FSDP and at another tp and dp."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_train import BASE, _largest, _run, serial_training
from torch.distributed.tensor import DTensor

from autotp.run.train import TrainConfig, Trainer
from autotp.testing import run_on_gloo

# clip 0.1: every step is clipped, so the global norm over tp and dp shards is exercised
CFG = dataclasses.replace(BASE, tp=2, dp=2, fsdp=True, dtype="float64", clip=0.1, steps=4)


def _close(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_fsdp_trains_as_serial_and_its_checkpoints_resume_anywhere(tmp_path: Path) -> None:
    """tp 2 x dp 2 under FSDP (accum 2, clipped) equals serial training, loss by loss and
    weight by weight; its checkpoint resumes there (with sequence parallelism on), at tp 2
    x dp 1 without FSDP and at tp 1, each continuing as the serial run does."""
    losses: list[float] = []
    states: dict = {2: None}
    want = serial_training(CFG, losses, states)
    ckpt = str(tmp_path / "run")
    first = run_on_gloo(_run, 4, dataclasses.replace(CFG, steps=2), ckpt, False, (2,))
    for r in first:
        assert _largest(r["final"], states[2]) <= 1e-10
        assert _close(r["losses"], losses[:2]) <= 1e-12
    # the first resumes with sequence parallelism too: tp 2 x sp x dp 2 x FSDP
    for tp, dp, fsdp, sp in ((2, 2, True, True), (2, 1, False, False), (1, 1, False, False)):
        cfg = dataclasses.replace(CFG, tp=tp, dp=dp, fsdp=fsdp, sp=sp)
        moved = run_on_gloo(_run, tp * dp, cfg, ckpt, True)[0]
        assert _largest(moved["final"], want) <= 1e-10
        assert _close(moved["losses"], losses[2:]) <= 1e-12


def _held(rank: int, world: int, cfg: TrainConfig) -> dict:
    """What a rank holds after one step: its parameters, and their local and TP sizes."""
    trainer = Trainer(cfg)
    trainer.train_step()
    params = trainer.params
    moments = [s["exp_avg"] for s in trainer.opt.state.values()]
    return {
        "dtensors": all(isinstance(t, DTensor) for t in params + moments),
        "local": sum(p.to_local().numel() for p in params),
        "moments": sum(m.to_local().numel() for m in moments),
        "whole": sum(p.numel() for p in params),
    }


def test_fsdp_shards_parameters_and_moments_over_dp() -> None:
    held = run_on_gloo(_held, 2, dataclasses.replace(CFG, tp=1, steps=1, accum=1))
    for h in held:
        assert h["dtensors"]
        assert h["moments"] == h["local"]  # Adam's moments are sharded as the weights
        assert h["local"] < h["whole"] * 0.6  # about half (odd row counts round up)
    assert sum(h["local"] for h in held) == held[0]["whole"]  # the two halves: all of it
