"""The benchmark's peers (bench/peers.py) are right, so the comparisons mean something:
PyTorch's DTensor TP with the hand-written plans and the hand-written Megatron GPT-2
compute the serial loss and gradients in float64 on gloo, and the dispatcher-level
collective counter agrees with autotp's own count and with Megatron's optimum."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import autotp
from autotp.testing import run_on_gloo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import comm  # noqa: E402
import peers  # noqa: E402

pytest.importorskip("transformers")

# replicated parameters (the same on every rank): their gradients sum the whole backward,
# through every f, so a missing or doubled all-reduce shows in them
REPLICATED = {
    "gpt2": ["transformer.h.0.ln_1.weight", "transformer.wpe.weight"],
    "hf-gpt2": ["transformer.h.0.ln_1.weight", "transformer.wpe.weight"],
    "bert": [
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        "bert.embeddings.position_embeddings.weight",
    ],  # fmt: skip
    "hf-bert-mlm": [
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        "bert.embeddings.position_embeddings.weight",
    ],  # fmt: skip
}
EMBEDDING = {
    "gpt2": "transformer.wte.weight",
    "hf-gpt2": "transformer.wte.weight",
    "bert": "bert.embeddings.word_embeddings.weight",
    "hf-bert-mlm": "bert.embeddings.word_embeddings.weight",
}


def _check(rank: int, world: int, kinds: tuple[str, ...], sizes: comm.Sizes) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    worst: dict[str, float] = {}
    counts: dict[str, tuple] = {}
    for kind in kinds:
        model, x = comm.make(kind, sizes)
        model = model.double()
        loss = peers.step(model, x)
        grads = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)  # the peers copy parts of the model, grads too
        tests = [("dtensor", peers.dtensor_model(kind, model, mesh))]
        if kind == "gpt2":
            tests.append(("megatron", peers.MegatronGPT2(model, rank, world)))
        for how, module in tests:
            key = f"{kind}/{how}"
            got = peers.step(module, x, dtensor=how == "dtensor")
            diffs = [abs(got - loss).item()]
            if how == "dtensor":
                params = dict(module.named_parameters())
                for name in REPLICATED[kind] + [EMBEDDING[kind]]:
                    g = params[name].grad
                    g = g.full_tensor() if isinstance(g, DTensor) else g
                    diffs.append((g - grads[name]).abs().max().item())
            else:
                n = module.wte.shape[0]
                serial_wte = grads[EMBEDDING[kind]][rank * n : (rank + 1) * n]
                diffs.append((module.wte.grad - serial_wte).abs().max().item())
                for mine, name in ((module.ln_f, "ln_f"), (module.wpe, "wpe")):
                    serial = grads[f"transformer.{name}.weight"]
                    diffs.append((mine.weight.grad - serial).abs().max().item())
            worst[key] = max(diffs)
        # the counter sees what autotp's own log sees, and Megatron's optimum
        ours = autotp.parallelize(model, world, x, vocab=autotp.VocabOptions(gather_outputs=False))
        counter = peers.CollectiveCounter()
        with autotp.count_collectives() as log, counter:
            peers.step(ours, x)
        seen = [(c.phase, c.elements) for c in counter.log]
        counts[kind] = (seen, [(d, n) for _, d, n in log.events], comm.per_phase(counter.log))
    return {"worst": worst, "counts": counts}


SIZES = comm.Sizes(layers=2, hidden=32, heads=4, vocab=256, batch=2, seq=16)
KINDS = ("gpt2", "bert", "hf-gpt2", "hf-bert-mlm")


@pytest.fixture(scope="module")
def on_gloo() -> list[dict]:
    return run_on_gloo(_check, 2, KINDS, SIZES, timeout=300)


def test_peers_compute_the_serial_function(on_gloo) -> None:
    for rank in on_gloo:
        for key, diff in rank["worst"].items():
            # transformers' GPT-2 computes its loss in float32, in serial too
            assert diff < (1e-6 if key.startswith("hf-gpt2") else 1e-10), (key, diff)


def test_counter_agrees_with_autotp_and_the_optimum(on_gloo) -> None:
    for kind in KINDS:
        seen, logged, phases = on_gloo[0]["counts"][kind]
        assert seen == logged, kind  # same collectives, same order, same sizes
        # (count, bytes) per phase
        assert phases == comm.optimum(kind, SIZES, itemsize=8), kind
