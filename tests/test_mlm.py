"""Masked-LM training (`autotp train --objective mlm`): BERT's masking drawn from (seed, step)
alone, the same on every rank of a TP group, at any dp and after a resume; the loss is the
model's own, from the masked positions only; a model that cannot do an objective is told
so in the command's words."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autotp.run import cli
from autotp.run.checkpoint import Checkpoints
from autotp.run.data import TokenData
from autotp.run.objective import IGNORE, mlm_batch, mlm_val_batch
from autotp.run.resolve import build
from autotp.run.train import TrainConfig, Trainer
from autotp.testing import run_on_gloo

DATA = TokenData(torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(1))
                 .to(torch.uint8), 256, "random bytes")  # fmt: skip


def test_masking_is_fixed_by_seed_and_step_and_is_berts() -> None:
    rng = torch.get_rng_state()
    kw = {"seed": 0, "mask_id": 256, "vocab": 256}
    x, y = mlm_batch(DATA, 3, 64, 256, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is not touched
    again = mlm_batch(DATA, 3, 64, 256, **kw)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(y, mlm_batch(DATA, 4, 64, 256, **kw)[1])  # another step
    # each data-parallel rank (and micro-batch) masks its own rows as a serial run does
    parts = [mlm_batch(DATA, 3, 64, 256, dp_rank=r, dp_size=2, micro=m, micro_steps=2, **kw)
             for r in range(2) for m in range(2)]  # fmt: skip
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(parts[0][1], parts[2][1])  # dp ranks 0 and 1 differ
    # BERT's proportions, over 16,384 positions
    original = DATA.windows(_offsets(3, 64, 256), 256)
    chosen = y != IGNORE
    assert torch.equal(y[chosen], original[chosen])  # the labels are the original ids...
    assert torch.equal(x[~chosen], original[~chosen])  # ...and nothing else is changed
    assert chosen.any(dim=1).all()  # every row scores something
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    n = chosen.sum().item()
    masked = (x[chosen] == 256).sum().item() / n
    kept = (x[chosen] == original[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.025 and abs(kept - 0.1) < 0.02  # (a random id may be its own)
    assert abs(1 - masked - kept - 0.1) < 0.02
    assert x.max().item() == 256 and x[x != 256].max().item() < 256
    vx, vy = mlm_val_batch(original[:4], 0, seed=0, mask_id=256, vocab=256)
    assert torch.equal(vy, mlm_val_batch(original[:4], 0, seed=0, mask_id=256, vocab=256)[1])


def _offsets(step: int, batch: int, seq: int) -> torch.Tensor:
    """The windows data.batch takes at this step (seed 0)."""
    from autotp.run.data import _mix

    gen = torch.Generator().manual_seed(_mix(0, step))
    return torch.randint(0, len(DATA) - seq, (batch,), generator=gen)


BERT_BYTES = """
from autotp.models import build


def tiny():  # bert-tiny with room for the byte ids and a [MASK] id (256)
    return build("bert-tiny", vocab_size=260, max_position_embeddings=64)
"""


def _fit(rank: int, world: int, cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    ck = Checkpoints(cfg.ckpt_dir)
    resumed = ck.resume(trainer)
    out: dict = {"resumed": resumed, "objective": trainer.objective}
    if resumed is None:  # the first micro-batch's loss, against the serial model by hand
        x, y = trainer._micro(0, 0)
        out["xy"] = (x, y)
        out["loss"] = trainer.loss(x, y).item()
    out["result"] = trainer.fit(ck)
    out["losses"] = trainer.losses
    return out


def test_mlm_training_at_tp2_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bert_bytes.py").write_text(BERT_BYTES)
    spec = f"{tmp_path}/bert_bytes.py:tiny"
    cfg = TrainConfig(model=spec, tp=2, steps=4, batch=4, seq=32, warmup=1, lr=5e-3,
                      save_every=2, dtype="float64", progress=False, eval_batches=1,
                      ckpt_dir=str(tmp_path / "run"))  # fmt: skip
    first, second = run_on_gloo(_fit, 2, cfg)
    assert first["objective"] == "mlm"  # chosen by the model
    # every rank of the TP group masked the same way and computed the same loss
    assert all(torch.equal(a, b) for a, b in zip(first["xy"], second["xy"], strict=True))
    assert first["losses"] == second["losses"]
    # the model's own loss over the chosen positions only, as the serial model gives it
    x, y = first["xy"]
    model = build(spec, seed=cfg.seed).double()
    logits, _ = model(x)
    scored = y != -100
    by_hand = F.cross_entropy(logits[scored], y[scored]).item()
    assert abs(first["loss"] - by_hand) < 1e-10
    assert abs(by_hand - math.log(260)) < 0.2  # untrained: about uniform over 260 ids
    losses = first["losses"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    val = first["result"]["val_perplexity"]
    assert math.isfinite(val) and 1 < val < 300  # masked-token perplexity
    meta = json.loads((tmp_path / "run" / "step_00000004" / "autotp.json").read_text())
    assert meta["objective"] == "mlm" and meta["mask_id"] == 256
    # a resume masks exactly as the uninterrupted run did
    (tmp_path / "run" / "latest").write_text("step_00000002")
    again = run_on_gloo(_fit, 2, dataclasses.replace(cfg, save_every=0))[0]
    assert again["resumed"].name == "step_00000002"
    assert again["losses"] == losses[2:]
    # evaluated by its masked-token perplexity; it cannot continue a prompt
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--tokens", "3200"]) == 0
    assert "validation masked-token perplexity" in capsys.readouterr().out
    assert cli.main(["generate", str(tmp_path / "run"), "--prompt", "def "]) == 2
    text = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "masked language model" in text and "--objective clm" in text


BERT_NO_ROOM = """
from autotp.models import build


def tiny():
    return build("bert-tiny", vocab_size=256)
"""


def test_a_model_that_cannot_do_the_objective_is_told_in_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed.run as torchrun

    monkeypatch.setattr(torchrun, "run", lambda *a, **k: pytest.fail("torchrun was started"))
    (tmp_path / "bert_bytes.py").write_text(BERT_BYTES)
    (tmp_path / "no_room.py").write_text(BERT_NO_ROOM)
    cases = [
        (["--objective", "mlm"], "gpt2-bytes cannot be trained with --objective mlm"),
        (["--model", f"{tmp_path}/bert_bytes.py:tiny", "--objective", "clm"],
         "is a masked language model"),
        (["--model", f"{tmp_path}/no_room.py:tiny"], "no id 256 to mask with"),
        (["--model", "bert-tiny"], "bert-tiny has a vocabulary of 97"),
        (["--objective", "bert"], "invalid choice: 'bert'"),
    ]  # fmt: skip
    for argv, says in cases:
        assert cli.main(["train", *argv]) == 2, argv
        out = capsys.readouterr()
        text = " ".join((out.out + out.err).replace("│", " ").split())
        assert says in text and "Traceback" not in text, (argv, text)
        assert "check the command" in text and "hint:" in text, text
    assert cli.main(["train", "--help"]) == 0
    assert "--objective {clm,mlm}" in capsys.readouterr().out
