"""The loop people write, on a parallel module, gives the serial model's numbers: AdamW,
`torch.nn.utils.clip_grad_norm_` at a norm that really clips, three steps. The norm it
returns is the serial norm on every rank, and the weights after the steps are serial's."""

from __future__ import annotations

import copy

import pytest
import torch

import autotp
from autotp.models import build
from autotp.testing import run_on_gloo

STEPS, MAX_NORM = 3, 0.05


def _model(name: str) -> tuple[torch.nn.Module, dict]:
    if name == "gpt2-tiny":
        torch.manual_seed(0)
        model = build("gpt2-tiny", n_layer=2, dropout=0.0).double()
        return model, model.example_inputs()
    from hf_models import build as hf_build
    from hf_models import inputs

    return hf_build("llama", kv_heads=2).double(), inputs("llama")


def _loss(out) -> torch.Tensor:
    return out[1] if isinstance(out, tuple) else out.loss


def _loop(module: torch.nn.Module, x: dict, **clip) -> list[float]:
    """AdamW with clipping: the loop a transformers user writes. The norms returned."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    norms = []
    for _ in range(STEPS):
        _loss(module(**x)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_NORM, **clip)))
        opt.step()
        opt.zero_grad()
    return norms


def _serial(name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model, x = _model(name)
    model = copy.deepcopy(model)
    norms = _loop(model, x)
    return norms, model.state_dict()


def _assert_same(norms, state, ref_norms, ref_state) -> None:
    assert norms[0] > 2 * MAX_NORM  # it really clips
    assert norms == pytest.approx(ref_norms, rel=1e-9)
    for k, ref in ref_state.items():
        rel = (state[k] - ref).norm() / ref.norm().clamp_min(1e-30)
        assert rel <= 1e-6, (k, float(rel))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama"])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_clipped_adamw_loop_in_simulate_equals_serial(name: str, foreach) -> None:
    model, x = _model(name)
    sim = autotp.simulate(model, 2, x if name == "gpt2-tiny" else None)
    norms = _loop(sim, x, foreach=foreach)
    _assert_same(norms, autotp.full_state_dict(sim), *_serial(name))


def _on_rank(rank: int, world: int, name: str) -> tuple[list[float], dict]:
    model, x = _model(name)
    module = autotp.parallelize(model, world, x if name == "gpt2-tiny" else None)
    norms = _loop(module, x)
    return norms, {k: v.detach() for k, v in autotp.full_state_dict(module).items()}


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama"])
def test_clipped_adamw_loop_on_gloo_equals_serial(name: str) -> None:
    ref = _serial(name)
    for norms, state in run_on_gloo(_on_rank, 2, name):
        _assert_same(norms, state, *ref)
