"""The runner: training over TP x DP equals serial training, initialisation equals the
serial model's, checkpoints resume exactly (also at another tp and dp), survive a killed
save and a killed rank, and export to the unmodified model."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import autotp
from autotp.models import build
from autotp.run import data as data_mod
from autotp.run.checkpoint import Checkpoints, read_serial_state
from autotp.run.train import TrainConfig, Trainer, lr_at
from autotp.runtime.comm import LocalComm
from autotp.testing import run_on_gloo

BASE = TrainConfig(steps=5, batch=8, seq=32, accum=2, warmup=2, progress=False, eval_batches=2)


def serial_training(
    cfg: TrainConfig, losses: list[float] | None = None, states: dict | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The same run on the unmodified model in one process: the oracle. Each step's loss
    (the mean over its micro-batches) is appended to `losses`, and the weights after step
    N are kept in `states[N]` for each N it holds, when given. `model`: a transformers
    model built from the seed (it shifts its labels itself), else cfg.model's."""
    hf = model is not None
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build(cfg.model)
    model = model.to(getattr(torch, cfg.dtype))
    train, _ = data_mod.load(cfg.data).split(0.05)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        total = 0.0
        for micro in range(cfg.accum):
            x, y = data_mod.batch(train, step, cfg.batch, cfg.seq, seed=cfg.seed, micro=micro,
                                  micro_steps=cfg.accum)  # fmt: skip
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
            (loss / cfg.accum).backward()
            total += loss.item() / cfg.accum
        if losses is not None:
            losses.append(total)
        norm = torch.sqrt(sum(p.grad.double().square().sum() for p in params))
        scale = (cfg.clip / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(scale.to(p.grad.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if states is not None and step + 1 in states:
            states[step + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(rank: int, world: int, cfg: TrainConfig, ckpt: str | None = None,
         resume: bool = False, save_at: tuple[int, ...] = ()) -> dict:  # fmt: skip
    trainer = Trainer(cfg)
    ck = Checkpoints(ckpt) if ckpt else None
    if ck and resume:
        assert ck.resume(trainer)
    start = {k: v.clone() for k, v in trainer.serial_state().items()}
    while trainer.step < cfg.steps:
        trainer.train_step()
        if ck and trainer.step in save_at:
            ck.save(trainer)
    final = {k: v.clone() for k, v in trainer.serial_state().items()}
    kinds = sorted({type(m).__name__ for m in trainer.module.modules()})
    return {"start": start, "final": final, "losses": trainer.losses, "kinds": kinds}


def _largest(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# Adam divides each update by the gradient's running RMS, so float32 rounding in a gradient
# that is ~0 in exact arithmetic can move that weight by up to ~lr per step, in any two
# float32 runs that sum in different orders; float32 is therefore checked at a smaller lr.
@pytest.mark.parametrize(
    ("dtype", "lr", "tol"), [("float64", BASE.lr, 1e-10), ("float32", 5e-4, 1e-5)]
)
def test_tp2_dp2_training_equals_serial(dtype: str, lr: float, tol: float) -> None:
    cfg = dataclasses.replace(BASE, tp=2, dp=2, dtype=dtype, lr=lr, min_lr=lr / 10)
    results = run_on_gloo(_run, 4, cfg)
    want = serial_training(cfg)
    for r in results:
        assert _largest(r["final"], want) <= tol
    assert len({tuple(r["losses"]) for r in results}) == 1  # every rank logged the same


def test_tp2_training_with_sequence_parallelism_equals_serial() -> None:
    """`autotp train --sp`: the norms, residuals and dropout between blocks split along the
    sequence; the weights after 5 AdamW steps (clipped, accumulated) are serial's."""
    cfg = dataclasses.replace(BASE, tp=2, dtype="float64", sp=True)
    results = run_on_gloo(_run, 2, cfg)
    want = serial_training(cfg)
    for r in results:
        assert _largest(r["final"], want) <= 1e-10
    assert results[0]["losses"] == results[1]["losses"]


def test_initial_weights_equal_a_serial_initialisation() -> None:
    cfg = dataclasses.replace(BASE, tp=2, steps=0)
    results = run_on_gloo(_run, 2, cfg)
    torch.manual_seed(cfg.seed)
    serial = build(cfg.model).state_dict()
    assert _largest(results[0]["start"], serial) == 0.0


def test_a_rank_of_8_3b_holds_one_eighth_of_the_split_weights() -> None:
    """On the meta device: what rank 3 of 8 would hold, without allocating anything."""
    from autotp.build.materialise import build_rank_module

    with torch.device("meta"):
        model = build("megatron-8.3b")
    p = autotp.plan(model, 8, model.example_inputs(batch=1, seq=64))
    rank = build_rank_module(model, p, 3, LocalComm())
    serial = dict(model.named_parameters())
    split = sum(t.numel() for n, t in serial.items() if n in p.splits)
    repl = sum(t.numel() for n, t in serial.items() if n not in p.splits)
    held = sum(t.numel() for t in rank.parameters())
    assert held == split // 8 + repl  # (51,200 rows divide by 8 x 128: no padding)
    assert all(t.is_meta for t in rank.parameters())


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_reshards(tmp_path: Path) -> None:
    cfg = dataclasses.replace(BASE, tp=2, steps=6, dtype="float64")
    whole = run_on_gloo(_run, 2, cfg)[0]
    ckpt = str(tmp_path / "run")
    first = run_on_gloo(_run, 2, dataclasses.replace(cfg, steps=3), ckpt, False, (3,))[0]
    again = run_on_gloo(_run, 2, cfg, ckpt, True)[0]
    assert first["losses"] + again["losses"] == whole["losses"]  # the same losses, exactly
    assert _largest(again["final"], whole["final"]) == 0.0
    # load the tp=2 checkpoint at another layout (at dp 2 sharded by FSDP)
    for tp, dp, fsdp in ((1, 2, True), (4, 1, False)):
        other = dataclasses.replace(cfg, tp=tp, dp=dp, fsdp=fsdp)
        moved = run_on_gloo(_run, tp * dp, other, ckpt, True)[0]
        assert _largest(moved["final"], whole["final"]) <= 1e-10


def test_a_killed_save_never_replaces_the_last_good(tmp_path: Path) -> None:
    cfg = dataclasses.replace(BASE, tp=2, steps=2)
    run_on_gloo(_run, 2, cfg, str(tmp_path), False, (2,))
    broken = tmp_path / "step_00000004.tmp"  # what a save killed midway leaves
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    assert Checkpoints(tmp_path).latest() == tmp_path / "step_00000002"
    resumed = run_on_gloo(_run, 2, dataclasses.replace(cfg, steps=3), str(tmp_path), True)
    assert len(resumed[0]["losses"]) == 1  # continued from step 2


@pytest.mark.slow
def test_export_loads_into_the_unmodified_model(tmp_path: Path) -> None:
    cfg = dataclasses.replace(BASE, tp=2, steps=2)
    out = run_on_gloo(_run, 2, cfg, str(tmp_path / "ck"), False, (2,))[0]
    autotp_cli = [sys.executable, "-m", "autotp", "export", str(tmp_path / "ck"),
                  str(tmp_path / "gpt2.safetensors")]  # fmt: skip
    subprocess.run(autotp_cli, check=True, capture_output=True)
    from safetensors.torch import load_file

    model = build(cfg.model)
    model.load_state_dict(load_file(str(tmp_path / "gpt2.safetensors")), strict=True)
    assert _largest(model.state_dict(), out["final"]) == 0.0
    assert _largest(read_serial_state(tmp_path / "ck"), out["final"]) == 0.0
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    lamb = tmp_path / "l.txt"
    lamb.write_text("import os\nfrom collections import defaultdict\n")
    cmd = [sys.executable, "-m", "autotp", "eval", str(tmp_path / "ck"), "--text", str(text),
           "--lambada", str(lamb)]  # fmt: skip
    ev = subprocess.run(cmd, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert "perplexity" in ev.stdout and "(context 32)" in ev.stdout  # the trained length
    assert "last-word accuracy" in ev.stdout and "over 2 passages" in ev.stdout


def _launch(ckpt: Path, steps: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "autotp", "train", "--max-restarts", "4", "--steps",
           str(steps), "--batch", "8", "--seq", "32", "--dtype", "float64", "--save-every", "5",
           "--no-progress", "--ckpt-dir", str(ckpt), *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def _workers(launcher: int) -> list[int]:
    """The training workers the launcher at pid `launcher` started (its children: other
    tests' runs, on the other pytest worker, are not this test's to kill)."""
    out = subprocess.run(["pgrep", "-P", str(launcher), "-f", "--", r"-m autotp\.run\.train"],
                         capture_output=True, text=True)  # fmt: skip
    return [int(p) for p in out.stdout.split()]


def _one_thread(rank: int, world: int, cfg: TrainConfig) -> dict:
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: the same float sums
    return _run(rank, world, cfg)


@pytest.mark.slow
def test_kill_9_of_a_rank_restarts_and_resumes(tmp_path: Path) -> None:
    """torchrun restarts the group after a rank dies; training resumes from the last
    checkpoint and ends with the parameters of an uninterrupted run."""
    steps = 15  # a checkpoint every 5: killed after the first, 10 steps before the end
    killed = _launch(tmp_path / "killed", steps)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "killed" / "step_00000005").exists():
            assert time.time() < deadline and killed.poll() is None, "no checkpoint appeared"
            time.sleep(0.05)
        victims = _workers(killed.pid)
        assert victims, "no worker to kill"
        os.kill(victims[-1], signal.SIGKILL)
        output = killed.communicate(timeout=300)[0]
    finally:
        if killed.poll() is None:  # take the launcher and its workers down together
            os.killpg(killed.pid, signal.SIGKILL)
            killed.communicate()
    assert killed.returncode == 0, output
    # the uninterrupted run, in this process's gloo ranks with torchrun's one thread each
    cfg = TrainConfig(steps=steps, batch=8, seq=32, dtype="float64", progress=False)
    a = run_on_gloo(_one_thread, 2, cfg)[0]["final"]
    b = read_serial_state(tmp_path / "killed")
    assert _largest(a, {k: b[k] for k in a}) == 0.0
    assert math.isfinite(float(a["lm_head.weight"].sum()))


FACTORIES = """
import torch


def tiny_gpt2():
    from autotp.models import build

    return build("gpt2-tiny", vocab_size=256, block_size=64)


class WithSpare(torch.nn.Module):
    # gpt2-tiny and a parameter its forward never reads

    def __init__(self):
        super().__init__()
        self.inner = tiny_gpt2()
        self.spare = torch.nn.Linear(4, 4)

    def forward(self, idx, targets=None):
        return self.inner(idx, targets)

    def example_inputs(self, batch=2, seq=16):
        return self.inner.example_inputs(batch=batch, seq=seq)


def with_spare():
    return WithSpare()


def tiny_hf_gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=64, use_cache=False))


def tiny_llama(vocab=256, intermediate=64):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False))


def llama_to_draw():
    # embedding, head and MLP weights of 64Ki elements or more: drawn per rank
    return tiny_llama(vocab=4096, intermediate=2048)
"""


def _first_loss(rank: int, world: int, cfg: TrainConfig) -> float:
    trainer = Trainer(cfg)
    return trainer.train_step()


@pytest.mark.parametrize("factory", ["tiny_gpt2", "tiny_llama"])
def test_user_factories_and_hf_models_train(tmp_path: Path, factory: str) -> None:
    """`--model file.py:fn` (here also a transformers Llama): built whole from the seed on
    every rank, its shards cut from it; the first loss is the serial model's."""
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    cfg = dataclasses.replace(BASE, model=f"{path}:{factory}", tp=2, accum=1, dtype="float64")
    got = run_on_gloo(_first_loss, 2, cfg)[0]
    model = _factory(path, factory, cfg.seed).double()
    train, _ = data_mod.load(None).split(0.05)
    x, y = data_mod.batch(train, 0, cfg.batch, cfg.seq, seed=cfg.seed)
    with torch.no_grad():
        want = model(input_ids=x, labels=x).loss if factory == "tiny_llama" else model(x, y)[1]
    assert abs(got - want.item()) <= 1e-6  # Llama's loss is float32 inside the model


def _factory(path: Path, name: str, seed: int) -> torch.nn.Module:
    """What `--model path:name` builds, from `seed`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("factories", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    return getattr(mod, name)()


@pytest.mark.slow
def test_a_transformers_model_trains_in_the_region_form_equal_to_serial(tmp_path: Path) -> None:
    """`autotp train --model <a transformers model>` builds what `autotp.parallelize` gives a
    library user: its layers, embedding and head as parallel regions, the model's own
    Python between them. A Llama with 2 KV heads at tp=2 x dp=2 under FSDP2: 3 clipped,
    accumulated AdamW steps leave the serial model's weights."""
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    cfg = dataclasses.replace(BASE, model=f"{path}:tiny_llama", tp=2, dp=2, fsdp=True, steps=3,
                              dtype="float64")  # fmt: skip
    results = run_on_gloo(_run, 4, cfg)
    want = serial_training(cfg, model=_factory(path, "tiny_llama", cfg.seed))
    assert {"ParallelLlamaDecoderLayer", "ParallelEmbedding", "ParallelLinear"} <= set(
        results[0]["kinds"]
    )
    for r in results:
        assert _largest(r["final"], want) <= 1e-10


@pytest.mark.slow
def test_a_region_form_run_resumes_exactly_with_its_dropout(tmp_path: Path) -> None:
    """A transformers GPT-2 (dropout 0.1 inside its layers and between them, tied head) at
    tp=2: stopped after 2 steps and resumed, its losses and weights are the uninterrupted
    run's, bit for bit: the checkpoint holds the layers' dropout streams and the random
    state the model's own Python draws from."""
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    cfg = dataclasses.replace(BASE, model=f"{path}:tiny_hf_gpt2", tp=2, steps=4, accum=1,
                              dtype="float64")  # fmt: skip
    whole = run_on_gloo(_run, 2, cfg)[0]
    ckpt = str(tmp_path / "run")
    first = run_on_gloo(_run, 2, dataclasses.replace(cfg, steps=2), ckpt, False, (2,))[0]
    again = run_on_gloo(_run, 2, cfg, ckpt, True)[0]
    assert "ParallelGPT2Block" in whole["kinds"]
    assert first["losses"] + again["losses"] == whole["losses"]
    assert _largest(again["final"], whole["final"]) == 0.0


def _two_steps(rank: int, world: int, cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    spare = trainer.module.get_parameter("spare.weight").detach().clone()
    losses = [trainer.train_step() for _ in range(2)]
    moved = trainer.module.get_parameter("spare.weight") - spare
    return {"losses": losses, "moved": moved.abs().max().item()}


def test_a_parameter_the_graph_never_reads_trains_at_dp2(tmp_path: Path) -> None:
    """DDP (plain --dp) stops at a parameter with no gradient; one the rank module's graph
    never reads is frozen, as the serial optimizer never moves it either."""
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    cfg = dataclasses.replace(BASE, model=f"{path}:with_spare", tp=1, dp=2, accum=1, steps=2)
    a, b = run_on_gloo(_two_steps, 2, cfg)
    assert a["losses"] == b["losses"] and all(map(math.isfinite, a["losses"]))
    assert a["moved"] == 0.0
