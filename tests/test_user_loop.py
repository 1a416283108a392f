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


# The loop a transformers user writes: AdamW and a warmup schedule, two micro-batches
# accumulated per step, clipping, an evaluation in eval mode after each step, a resume
# from the state saved after step 2, and an export that from_pretrained reads.
HF_STEPS, ACCUM, SAVED_AT = 4, 2, 2


def _batches() -> list[dict]:
    out = []
    for i in range(HF_STEPS * ACCUM + 1):
        g = torch.Generator().manual_seed(10 + i)
        ids = torch.randint(1, 101, (2, 8), generator=g)  # hf_models' vocabulary
        mask = torch.ones_like(ids)
        mask[i % 2, :3] = 0
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})  # fmt: skip
    return out


def _hf_loop(module: torch.nn.Module, start: int = 0, saved: dict | None = None) -> dict:
    import transformers

    batches = _batches()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, HF_STEPS)
    if saved is not None:
        module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
    out: dict = {"norms": [], "evals": []}
    for step in range(start, HF_STEPS):
        module.train()
        for micro in range(ACCUM):
            (module(**batches[step * ACCUM + micro]).loss / ACCUM).backward()
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_NORM)))
        opt.step()
        sched.step()
        opt.zero_grad()
        module.eval()
        with torch.no_grad():
            out["evals"].append(float(module(**batches[-1]).loss))
        if step + 1 == SAVED_AT and saved is None:
            out["saved"] = copy.deepcopy({"model": module.state_dict(), "opt": opt.state_dict(),
                                          "sched": sched.state_dict()})  # fmt: skip
    return out


def _hf_model(seed: int = 0) -> torch.nn.Module:
    from hf_models import build as hf_build

    return hf_build("llama", kv_heads=2, seed=seed).double()


def _hf_on_rank(rank: int, world: int, folder: str, sp: bool) -> dict:
    import transformers

    module = autotp.parallelize(_hf_model(), world, sequence_parallel=sp)
    run = _hf_loop(module)
    full = {k: v.detach() for k, v in autotp.full_state_dict(module).items()}
    module.save_pretrained(folder)
    torch.distributed.barrier()
    exported = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64)
    resumed = autotp.parallelize(_hf_model(seed=7), world, sequence_parallel=sp)  # a new
    # process's model
    rerun = _hf_loop(resumed, start=SAVED_AT, saved=run.pop("saved"))
    ended = {k: v.detach() for k, v in autotp.full_state_dict(resumed).items()}
    return {"run": run, "full": full, "exported": exported.state_dict(), "rerun": rerun,
            "resumed": ended}  # fmt: skip


@pytest.mark.parametrize(("world", "sp"), [(2, False), (4, True)], ids=["tp2", "tp4-sp"])
@pytest.mark.slow
def test_a_transformers_users_loop_on_gloo_equals_serial(tmp_path, world, sp) -> None:
    """Norms, evaluation losses and weights equal serial's on every rank; the export
    from_pretrained reads is the serial model; the resumed run ends where the
    uninterrupted one does. At tp=4 with sequence parallelism: 2 key/value heads, each
    held by 2 ranks, and the split sequence handed from layer to layer."""
    model = _hf_model()
    serial = _hf_loop(model)
    state = model.state_dict()
    for r in run_on_gloo(_hf_on_rank, world, str(tmp_path), sp, timeout=240):
        run, rerun = r["run"], r["rerun"]
        assert run["norms"][0] > 2 * MAX_NORM  # it really clips
        assert run["norms"] == pytest.approx(serial["norms"], rel=1e-9)
        assert run["evals"] == pytest.approx(serial["evals"], rel=1e-9)
        assert rerun["evals"] == pytest.approx(serial["evals"][SAVED_AT:], rel=1e-9)
        for k, ref in state.items():
            for got in (r["full"][k], r["exported"][k], r["resumed"][k]):
                rel = (got - ref).norm() / ref.norm().clamp_min(1e-30)
                assert rel <= 1e-6, (k, float(rel))


def test_a_weight_frozen_when_built_and_unfrozen_later_counts_in_the_norm() -> None:
    """Built with a split and a replicated weight frozen (gpt2-tiny, the graph form),
    unfrozen before the loop: clip_grad_norm_ returns serial's norm (the split one counts
    over the ranks, the replicated one once)."""
    model, x = _model("gpt2-tiny")
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    model.transformer.h[0].ln_1.weight.requires_grad_(False)
    sim = autotp.simulate(model, 2, x)
    for p in (*sim.parameters(), *model.parameters()):
        p.requires_grad_(True)
    norms = []
    for m in (sim, model):
        _loss(m(**x)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)))
    assert norms[0] == pytest.approx(norms[1], rel=1e-9)


def _unfrozen_on_rank(rank: int, world: int) -> float:
    model, x = _model("gpt2-tiny")
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    module = autotp.parallelize(model, world, x)
    for p in module.parameters():
        p.requires_grad_(True)
    _loss(module(**x)).backward()
    return float(torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_NORM))


def test_a_weight_unfrozen_after_building_counts_over_gloo_ranks() -> None:
    model, x = _model("gpt2-tiny")
    _loss(model(**x)).backward()
    want = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    assert run_on_gloo(_unfrozen_on_rank, 2) == pytest.approx([want, want], rel=1e-9)
