"""The same checks on real processes: gloo on 127.0.0.1, 2 and 4 ranks, GPT-2 and BERT,
float32 and float64. Collectives are counted by wrapping torch.distributed.all_reduce
itself, so what is counted is what crossed the process group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import autotp
from autotp.models import build
from autotp.testing import assert_equivalent, run_on_gloo

TOL = {torch.float64: (1e-10, 0.0), torch.float32: (1e-6, 1e-5)}


def _equivalence_on_rank(rank: int, world: int, name: str, dtype: torch.dtype) -> dict:
    calls: list[int] = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        torch.manual_seed(0)
        model = build(name, **({"n_layer": 2} if name.startswith("gpt2") else {}))
        atol, rtol = TOL[dtype]
        report = assert_equivalent(
            model, None, world, dtype=dtype, atol=atol, rtol=rtol,
            parallel=lambda m, tp, x: autotp.parallelize(m, tp, x),
        )  # fmt: skip
    finally:
        dist.all_reduce = real
    return {"largest": report.largest(), "all_reduces": len(calls), "numel": sorted(set(calls))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
@pytest.mark.parametrize("world", [2, 4])
def test_parallelize_on_gloo_equals_serial(world: int, name: str, dtype: torch.dtype) -> None:
    results = run_on_gloo(_equivalence_on_rank, world, name, dtype)
    for r in results:
        # 2 layers x (2 forward + 2 backward), the embedding's, the loss's three and the
        # output layer's f: all-reduces in the one training step
        assert r["all_reduces"] == 8 + 1 + 3 + 1
        assert len(r["numel"]) == 2  # batch x seq x hidden, and batch x seq
    # every rank saw the same numbers (replicated values are identical across ranks)
    assert len({r["largest"] for r in results}) == 1


def _replicated_outputs_identical(rank: int, world: int) -> list[float]:
    torch.manual_seed(0)
    model = build("gpt2-tiny").double()
    x = model.example_inputs()
    par = autotp.parallelize(model, world, x)
    logits, loss = par(**x)
    loss.backward()
    return [loss.item(), logits.sum().item()]


def test_replicated_values_bitwise_identical_across_ranks() -> None:
    results = run_on_gloo(_replicated_outputs_identical, 2)
    assert results[0] == results[1]
