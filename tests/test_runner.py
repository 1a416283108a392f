"""The runner trusted with days of compute: bad arguments are refused before any process
starts, a damaged or dangling checkpoint never loses a run, nothing in a checkpoint runs
code, every run exports and evaluates whatever its model, a NaN stops training before it
is saved, errors are one panel with exit 2, Ctrl-C exits 130, and metrics.jsonl logs it."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import autotp
from autotp.common.errors import AutoTPError, CheckpointError, TrainingStopped
from autotp.run import cli
from autotp.run.checkpoint import Checkpoints, read_serial_state
from autotp.run.metrics import MetricsLog, Reporter, read_metrics
from autotp.run.safe_dcp import ALLOWED, SafeReader, problem
from autotp.run.train import TrainConfig, Trainer, resume
from autotp.testing import run_on_gloo

BASE = TrainConfig(steps=4, batch=4, seq=32, warmup=1, progress=False, eval_batches=1)


def _train(rank: int, world: int, cfg: TrainConfig, keep_last: int = 0) -> dict:
    """fit() as the worker runs it, with checkpoints and metrics in cfg.ckpt_dir."""
    trainer = Trainer(cfg)
    said: list[str] = []
    ck = Checkpoints(cfg.ckpt_dir, keep_last=keep_last, say=said.append)
    metrics = MetricsLog(Path(cfg.ckpt_dir) / "metrics.jsonl")
    found = resume(trainer, ck, metrics, said.append)
    trainer.fit(ck, metrics)
    state = {k: v.clone() for k, v in autotp.full_state_dict(trainer.module).items()}
    return {"resumed": found, "said": said, "state": state, "losses": trainer.losses}


def _run(tmp_path: Path, name: str = "run", **changes) -> tuple[Path, TrainConfig]:
    cfg = dataclasses.replace(BASE, ckpt_dir=str(tmp_path / name), **changes)
    return tmp_path / name, cfg


# -- arguments are checked in the launching process ---------------------------------------


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to start workers fails the test: these checks must come first."""
    import torch.distributed.run as torchrun

    def refuse(*a, **k):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(torchrun, "run", refuse)


def _panel(capsys: pytest.CaptureFixture) -> str:
    """What was printed, with the panel's frame and line breaks taken out."""
    out = capsys.readouterr()
    text = (out.out + out.err).replace("│", " ")
    return " ".join(text.split())


BAD_TRAIN = {
    "tp 0": (["--tp", "0"], "--tp 0: must be at least 1"),
    "dp 0": (["--dp", "0"], "--dp 0: must be at least 1"),
    "batch 0": (["--batch", "0"], "--batch 0: must be at least 1"),
    "negative steps": (["--steps", "-5"], "--steps -5: must be at least 1"),
    "nan lr": (["--lr", "nan"], "--lr nan: must be a positive number"),
    "float16": (["--dtype", "float16"], "invalid choice: 'float16'"),
    "typo": (["--stepz", "3"], "unrecognized arguments: --stepz"),
    "batch vs dp x accum": (["--batch", "6", "--accum", "4"], "not divisible by --dp 1 x"),
    "unknown model": (["--model", "gpt5"], "unknown model 'gpt5'"),
    "missing file": (["--model", "nowhere.py:build"], "no file nowhere.py"),
    "missing data": (["--data", "no/such/corpus"], "is not a known source"),
    "seq past block": (["--seq", "1000"], "--seq 1000 exceeds gpt2-bytes's 256 positions"),
    "heads vs tp": (["--tp", "3", "--strict"], "not divisible by tp=3"),
    "tp splits no block": (["--tp", "3"], "use --tp 2 or 4 or 8, or add --allow-unsplit"),
    "masked LM, byte data": (["--model", "bert-tiny"], "bert-tiny has a vocabulary of 97"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_arguments_exit_2_before_any_worker(
    case: str, no_torchrun: None, capsys: pytest.CaptureFixture
) -> None:
    argv, says = BAD_TRAIN[case]
    assert cli.main(["train", *argv]) == 2
    text = _panel(capsys)
    assert says in text
    assert "Traceback" not in text
    if case not in ("heads vs tp",):  # a plan refusal keeps its own title
        assert "check the command" in text and "cannot split" not in text


def test_factory_and_folder_mistakes(
    tmp_path: Path, no_torchrun: None, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "m.py").write_text("def other():\n    return None\n")
    assert cli.main(["train", "--model", f"{tmp_path}/m.py:build"]) == 2
    assert "has no function 'build'" in _panel(capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["train", "--ckpt-dir", str(blocker / "run")]) == 2
    assert "cannot be written" in _panel(capsys)
    tokens = tmp_path / "big.bin"
    torch.tensor([1, 2, 300] * 400, dtype=torch.int16).numpy().tofile(tokens)
    assert cli.main(["train", "--data", str(tokens)]) == 2
    assert "has a vocabulary of 256" in _panel(capsys)


def test_help_documents_every_option(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: 800)" in text and "(default: gpt2-bytes)" in text
    assert "torchrun's options pass through" in text and "--max-restarts" in text


# -- runs are never lost ------------------------------------------------------------------


def test_dangling_latest_truncated_shard_and_no_resume(
    tmp_path: Path, no_torchrun: None, capsys: pytest.CaptureFixture
) -> None:
    run, cfg = _run(tmp_path, steps=3, save_every=1)
    run_on_gloo(_train, 2, cfg)
    assert (run / "latest").read_text() == "step_00000003"
    # latest names a folder that is gone: the newest complete one is used, and said
    shutil.rmtree(run / "step_00000003")
    said: list[str] = []
    assert Checkpoints(run, say=said.append).latest() == run / "step_00000002"
    assert "step_00000003" in said[0] and "resuming from step_00000002" in said[0]
    # a truncated shard is named, and passed over
    shard = sorted((run / "step_00000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in problem(run / "step_00000002") and shard.name in problem(
        run / "step_00000002"
    )
    assert Checkpoints(run).latest() == run / "step_00000001"
    # latest holding garbage (or a path out of the folder) is not followed
    (run / "latest").write_text("../../etc")
    said.clear()
    assert Checkpoints(run, say=said.append).latest() == run / "step_00000001"
    assert "does not name a step folder" in said[0]
    # retention never deletes a checkpoint newer than the one just written
    shutil.copytree(run / "step_00000001", run / "step_00000009")
    Checkpoints(run, keep_last=1)._retire(run / "step_00000002")
    assert (run / "step_00000009").exists() and not (run / "step_00000001").exists()
    shutil.copytree(run / "step_00000009", run / "step_00000001")
    shutil.rmtree(run / "step_00000009")
    # --no-resume never overwrites a run
    assert cli.main(["train", "--ckpt-dir", str(run), "--no-resume"]) == 2
    assert "would overwrite it" in _panel(capsys)
    # a run with no complete checkpoint left stops instead of starting from step 0
    shutil.rmtree(run / "step_00000001")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpoints(run).latest()
    assert cli.main(["train", "--ckpt-dir", str(run)]) == 2
    assert "checkpoint problem" in _panel(capsys)


def test_resuming_a_changed_model_names_the_parameter(
    tmp_path: Path, no_torchrun: None, capsys: pytest.CaptureFixture
) -> None:
    factory = tmp_path / "mine.py"
    source = "from autotp.models import build\n\ndef tiny():\n    return build({})\n"
    factory.write_text(source.format('"gpt2-tiny", vocab_size=256, block_size=64'))
    run, cfg = _run(tmp_path, model=f"{factory}:tiny", steps=1)
    run_on_gloo(_train, 2, cfg)
    factory.write_text(source.format('"gpt2-tiny", vocab_size=256, block_size=32'))
    assert cli.main(["train", "--model", f"{factory}:tiny", "--ckpt-dir", str(run),
                     "--seq", "32"]) == 2  # fmt: skip
    text = _panel(capsys)
    assert (
        "transformer.wpe.weight was saved with shape [64, 32], but the model now has [32, 32]"
        in text
    )
    assert "checkpoint problem" in text
    assert cli.main(["train", "--ckpt-dir", str(run), "--seq", "32"]) == 2
    assert "holds a " in _panel(capsys)  # another model's run


def test_a_checkpoint_that_fails_to_load_gives_way_and_keep_last(tmp_path: Path) -> None:
    run, cfg = _run(tmp_path, steps=4, save_every=1)
    first = run_on_gloo(_train, 2, cfg, 2)[0]
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000003", "step_00000004"]
    # the same length, other bytes: only loading it can tell
    shard = sorted((run / "step_00000004").glob("*.distcp"))[0]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    assert problem(run / "step_00000004") is None
    again = run_on_gloo(_train, 2, dataclasses.replace(cfg, steps=5))[0]
    assert again["resumed"] == run / "step_00000003"
    assert any("step_00000004 could not be loaded" in s for s in again["said"])
    assert len(again["losses"]) == 2  # steps 4 and 5 again
    assert not (run / "step_00000004").exists() or any(run.glob("step_00000004.replaced-*"))
    assert len(first["losses"]) == 4


def test_a_nan_loss_stops_before_a_checkpoint(tmp_path: Path) -> None:
    run, cfg = _run(tmp_path, steps=3)

    def poisoned(rank: int, world: int) -> str:
        trainer = Trainer(cfg)
        with torch.no_grad():
            next(iter(trainer.module.parameters())).fill_(float("nan"))
        try:
            trainer.fit(Checkpoints(run))
        except TrainingStopped as e:
            return str(e)
        return "trained"

    said = run_on_gloo(poisoned, 2)
    assert all("the loss is nan at step 1" in s for s in said)
    assert not list(run.glob("step_*")) and not (run / "latest").exists()


# -- nothing in a checkpoint runs code --------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_metadata_file_runs_nothing(tmp_path: Path, capsys) -> None:
    run, cfg = _run(tmp_path, steps=1)
    run_on_gloo(_train, 2, cfg)
    step = run / "step_00000001"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"posix.system|os.system"):
        SafeReader(str(step)).read_metadata()
    assert "refused" in problem(step)
    assert cli.main(["export", str(step), str(tmp_path / "x.pt")]) == 2
    assert cli.main(["eval", str(step)]) == 2
    assert not marker.exists()
    assert ("torch", "Size") in ALLOWED and len(ALLOWED) < 25
    (step / "autotp.json").write_text("[]")  # valid JSON, not a description: no KeyError
    assert "not an autotp checkpoint's description" in problem(step)


def test_pickled_bytes_items_are_refused(tmp_path: Path) -> None:
    """DCP reads a non-tensor item back with an unrestricted torch.load: refused."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model/w": [1, 2]}, checkpoint_id=str(tmp_path), no_dist=True)
        with pytest.raises(CheckpointException) as info:
            dcp.load({"model/w": [0, 0]}, storage_reader=SafeReader(str(tmp_path)), no_dist=True)
    assert "pickled bytes" in str(next(iter(info.value.failures.values())))


# -- every run exports, evaluates and resumes --------------------------------------------

HF_FACTORY = """
import transformers


def tiny():
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=4, vocab_size=256, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0))
"""


@pytest.mark.slow
def test_a_tied_transformers_factory_run_exports_evaluates_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hf_model.py").write_text(HF_FACTORY)
    run, cfg = _run(tmp_path, model=f"{tmp_path}/hf_model.py:tiny", steps=2, dtype="float64")
    out = run_on_gloo(_train, 2, cfg)[0]
    meta = json.loads((run / "step_00000002" / "autotp.json").read_text())
    assert meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    state = read_serial_state(run)
    assert max((state[k] - out["state"][k]).abs().max().item() for k in out["state"]) == 0.0
    monkeypatch.chdir(tmp_path.parent)  # the factory's path is recorded absolute
    assert cli.main(["export", str(run), str(tmp_path / "m.safetensors")]) == 0
    assert cli.main(["eval", str(run), "--context", "16", "--tokens", "400"]) == 0
    assert "validation perplexity" in capsys.readouterr().out
    # a checkpoint cannot bring the code it asks to run
    planted = run / "hf_model.py"
    shutil.copy(tmp_path / "hf_model.py", planted)
    described = run / "step_00000002" / "autotp.json"
    original = described.read_text()
    described.write_text(original.replace(str(tmp_path / "hf_model.py"), str(planted)))
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 2
    assert "refused" in _panel(capsys)
    described.write_text(original)
    more = run_on_gloo(_train, 2, dataclasses.replace(cfg, steps=3))[0]
    assert more["resumed"] == run / "step_00000002" and len(more["losses"]) == 1


def test_eval_and_export_mistakes_are_one_panel(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, cfg = _run(tmp_path, steps=1)
    run_on_gloo(_train, 2, cfg)
    bad_text = tmp_path / "latin1.txt"
    bad_text.write_bytes("café au lait\n".encode("latin-1"))
    cases = [
        (["eval", str(run), "--text", str(tmp_path / "none.txt")], "No such file"),
        (["eval", str(run), "--lambada", str(bad_text)], "utf-8"),
        (["eval", str(run), "--stride", "0"], "--stride 0"),
        (["eval", str(run), "--context", "999"], "--context 999"),
        (["eval", str(tmp_path / "nothing")], "does not exist"),
        (["export", str(run), str(bad_text / "x.pt")], "cannot write"),
    ]
    for argv, says in cases:
        assert cli.main(argv) == 2, argv
        text = _panel(capsys)
        assert says in text and "Traceback" not in text, argv


# -- the log ------------------------------------------------------------------------------


def test_metrics_log_rows_and_resume(tmp_path: Path) -> None:
    run, cfg = _run(tmp_path, steps=4, log_every=2, save_every=2)
    run_on_gloo(_train, 2, cfg)
    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert set(r) == {"kind", "step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert rows[-1]["kind"] == "val" and rows[-1]["val_perplexity"] > 1
    # a crash after step 2's checkpoint: the resume drops what it trains again, once
    shutil.rmtree(run / "step_00000004")
    run_on_gloo(_train, 2, dataclasses.replace(cfg, steps=6))
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == [2, 4, 6]
    assert {"kind": "resume", "step": 2, "checkpoint": "step_00000002", "elapsed_s": 0.0} in rows


def test_plain_lines_off_a_terminal() -> None:
    report = Reporter(True, total=10, done=0)
    report.console.file = buf = io.StringIO()  # not a terminal: no live bar
    assert not report.live
    with report:
        report.step(1, 3.0, 100.0, None)
        row = {"lr": 1e-3, "grad_norm": 0.5, "elapsed_s": 1.5}
        report.step(2, 2.5, 100.0, row)
    assert buf.getvalue() == (
        "step 2/10  loss 2.5000  lr 1.000e-03  grad_norm 0.500  100 tok/s  1.5 s\n"
    )


# -- through torchrun -------------------------------------------------------------------


def _autotp(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "autotp", *argv], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_a_worker_error_is_one_panel_and_ctrl_c_exits_130(tmp_path: Path) -> None:
    small = ["--batch", "4", "--seq", "32", "--eval-batches", "1", "--no-progress"]
    # a NaN loss, found in the workers: the launcher shows their message once, exit 2
    nan = _autotp("train", "--steps", "20", "--lr", "1e30", "--warmup", "1", *small,
                  "--ckpt-dir", str(tmp_path / "nan"))  # fmt: skip
    out = nan.communicate(timeout=240)[0]
    assert nan.returncode == 2, out
    assert out.count("the loss is nan") == 1 and "training stopped" in out
    assert "Traceback" not in out and "ChildFailedError" not in out
    assert not list((tmp_path / "nan").glob("step_*"))
    # Ctrl-C: exit 130, the last complete checkpoint intact
    run = tmp_path / "run"
    p = _autotp("train", "--steps", "100000", "--save-every", "3", *small, "--ckpt-dir", str(run))
    try:
        deadline = time.time() + 240
        while not (run / "latest").exists():
            assert time.time() < deadline and p.poll() is None, p.stdout.read()
            time.sleep(0.1)
        os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 130, out
    latest = run / (run / "latest").read_text()
    assert problem(latest) is None
    assert read_serial_state(run)["lm_head.weight"].isfinite().all()


def test_a_worker_that_dies_without_a_message_is_named_by_its_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that exits without leaving autotp's error file (killed, os._exit) is
    reported by its global rank and its error file, with what to do next."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from autotp.run.launch import run_workers

    def die(args: object) -> None:
        failure = ProcessFailure(local_rank=1, pid=4242, exitcode=9, error_file="<none>")
        raise ChildFailedError("autotp.run.train", {3: failure})

    monkeypatch.setattr(torchrun, "run", die)
    with pytest.raises(AutoTPError) as info:
        run_workers("autotp.run.train", [], [], 4, say=lambda line: None)
    assert "--max-restarts" in str(info.value)
    assert "rank:   3, " in str(info.value) and "exit codes [9]" in str(info.value)


PHI3_FACTORY = """
import transformers


def tiny():
    transformers.logging.set_verbosity_error()
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, use_cache=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=0))
"""


def test_a_fused_projection_in_unequal_parts_is_read_back_whole(tmp_path: Path) -> None:
    """Phi-3's fused Q|K|V is split in parts of unequal widths (more query heads than
    key/value heads), at tp=4 with each of its 2 key/value heads held by 2 ranks: a
    checkpoint records those parts, so the serial state read back from it (export, eval,
    a resume at another tp: one reader) equals the trained model."""
    (tmp_path / "phi3.py").write_text(PHI3_FACTORY)
    run, cfg = _run(tmp_path, model=f"{tmp_path}/phi3.py:tiny", steps=1, dtype="float64",
                    tp=4)  # fmt: skip
    out = run_on_gloo(_train, 4, cfg)[0]
    meta = json.loads((run / "step_00000001" / "autotp.json").read_text())
    assert meta["splits"]["model.layers.0.self_attn.qkv_proj.weight"] == [
        0, 1, None, 1, [32, 16, 16], [1, 2, 2]]  # fmt: skip
    state = read_serial_state(run)
    assert max((state[k] - out["state"][k]).abs().max().item() for k in out["state"]) == 0.0
