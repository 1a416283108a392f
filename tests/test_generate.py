"""`autotp generate`: the same greedy continuation at any tp, whatever tp the run trained at;
seeded sampling that every rank draws alike; mistakes are one panel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import autotp
from autotp.run import cli
from autotp.run.checkpoint import Checkpoints
from autotp.run.generate import CachedLogits, sample
from autotp.run.train import TrainConfig, Trainer
from autotp.testing import run_on_gloo

GPT_BYTES = """
from autotp.models import build


def tiny():  # gpt2-tiny over bytes, 64 positions
    return build("gpt2-tiny", vocab_size=256, block_size=64)
"""


def _fit(rank: int, world: int, cfg: TrainConfig) -> list[float]:
    trainer = Trainer(cfg)
    trainer.fit(Checkpoints(cfg.ckpt_dir))
    return trainer.losses


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal byte-level run trained at tp=2 for a few steps, in float64."""
    folder = tmp_path_factory.mktemp("gen")
    (folder / "gpt_bytes.py").write_text(GPT_BYTES)
    cfg = TrainConfig(model=f"{folder}/gpt_bytes.py:tiny", tp=2, steps=3, batch=4, seq=32,
                      warmup=1, lr=1e-2, dtype="float64", progress=False, eval_batches=0,
                      ckpt_dir=str(folder / "run"))  # fmt: skip
    run_on_gloo(_fit, 2, cfg)
    return folder / "run"


def test_greedy_continuation_is_the_same_at_any_tp(run: Path, capfd: pytest.CaptureFixture) -> None:
    # --prompt longer than the model's 64 positions: the window is cropped
    argv = ["generate", str(run), "--prompt", "def main(" * 8, "--tokens", "30",
            "--temperature", "0"]  # fmt: skip
    assert cli.main([*argv, "--tp", "1"]) == 0  # in this process; the run trained at tp=2
    one = capfd.readouterr().out
    assert one.startswith("def main(" * 8) and len(one) >= 72 + 1
    assert cli.main([*argv, "--tp", "2"]) == 0  # through torchrun, 2 workers
    two = capfd.readouterr().out
    assert two == one
    # sampling: seeded, so the same text again (and on every rank)
    argv = ["generate", str(run), "--prompt", "import ", "--tokens", "20", "--seed", "3",
            "--temperature", "1", "--top-k", "5"]  # fmt: skip
    assert cli.main(argv) == 0
    first = capfd.readouterr().out
    assert cli.main(argv) == 0
    assert capfd.readouterr().out == first


def test_sample_greedy_top_k_and_byte_ids() -> None:
    table = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))

    def bigram(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]  # (1, T, 300): a vocabulary past the bytes

    greedy = sample(bigram, [1, 2], tokens=5, temperature=0, context=4)
    assert greedy[0] == int(table[2, :256].argmax())  # only byte ids are drawn
    for a, b in zip([2, *greedy[:-1]], greedy, strict=True):
        assert b == int(table[a, :256].argmax())
    drawn = sample(bigram, [7], tokens=50, temperature=1.0, top_k=3, seed=1, context=4)
    assert drawn == sample(bigram, [7], tokens=50, temperature=1.0, top_k=3, seed=1, context=4)
    for a, b in zip([7, *drawn[:-1]], drawn, strict=True):
        assert b in table[a, :256].topk(3).indices.tolist()
    seen: list[int] = []
    sample(bigram, [7], tokens=3, temperature=0.5, context=1, on_token=seen.append)
    assert len(seen) == 3 and max(seen) < 256


def test_generate_mistakes_are_one_panel(run: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0"),
        (["--prompt", "x", "--tokens", "0"], "--tokens and --tp must be at least 1"),
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "x", "--top-k", "-1"], "--top-k at least 0"),
        ([], "the following arguments are required: --prompt"),
    ]
    for argv, says in cases:
        assert cli.main(["generate", str(run), *argv]) == 2, argv
        text = " ".join(capsys.readouterr().err.replace("│", " ").split())
        assert says in text and "Traceback" not in text, (argv, text)
    assert cli.main(["generate", str(run.parent / "nothing"), "--prompt", "x"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


HF_BYTES = """
import transformers


def tiny():  # a transformers GPT-2 over bytes, 64 positions; training turns its cache off
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  vocab_size=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg)
"""


def _whole_window(model: torch.nn.Module):
    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits

    return logits


def test_a_transformers_model_continues_from_its_cache() -> None:
    """Each new token runs alone against the KV cache (each rank's own heads), and the
    continuation is the one the whole window gives, across the crop at the model's 64
    positions too (where the cache starts over)."""
    pytest.importorskip("transformers")
    namespace: dict = {}
    exec(HF_BYTES, namespace)  # noqa: S102 - the factory a run would name
    torch.manual_seed(0)
    model = namespace["tiny"]().double().eval()
    sim = autotp.simulate(model, 2)
    lengths: list[int] = []
    sim.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["input_ids"].shape[1]), with_kwargs=True
    )
    prompt = list(b"def main(")
    with torch.no_grad():
        want = sample(_whole_window(model), prompt, tokens=70, temperature=0, context=64)
        got = sample(CachedLogits(sim), prompt, tokens=70, temperature=0, context=64)
    assert got == want
    assert lengths[0] == len(prompt) and lengths[1:55] == [1] * 54  # until the crop


@pytest.mark.slow
def test_generate_of_a_transformers_run_uses_the_cache(tmp_path: Path, capfd) -> None:
    """A run of a transformers model (trained at tp=2 with sequence parallelism, in the
    region form) generates through the plan autotp.plan gives it, with the cache:
    the greedy text equals the one the serial model gives over the whole window."""
    pytest.importorskip("transformers")
    from autotp.run.checkpoint import serial_model

    (tmp_path / "hf_bytes.py").write_text(HF_BYTES)
    cfg = TrainConfig(model=f"{tmp_path}/hf_bytes.py:tiny", tp=2, sp=True, steps=2, batch=4,
                      seq=32, warmup=1, lr=1e-2, dtype="float64", progress=False,
                      eval_batches=0, ckpt_dir=str(tmp_path / "run"))  # fmt: skip
    run_on_gloo(_fit, 2, cfg)
    capfd.readouterr()
    argv = ["generate", str(tmp_path / "run"), "--prompt", "import ", "--tokens", "12",
            "--temperature", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capfd.readouterr().out
    model, _ = serial_model(str(tmp_path / "run"), say=lambda line: None)
    with torch.no_grad():
        drawn = sample(_whole_window(model.eval()), list(b"import "), tokens=12,
                       temperature=0, context=64)  # fmt: skip
    want = "import " + bytes(drawn).decode("utf-8", errors="replace")
    assert text.rstrip("\n") == want
