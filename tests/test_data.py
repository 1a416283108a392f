"""Token data: every source is local and deterministic, and a step's global batch is the same
whatever the data-parallel size and gradient-accumulation split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from autotp import AutoTPError
from autotp.run.data import (
    TokenData,
    batch,
    load,
    stdlib_corpus,
    text_corpus,
    token_file,
    val_batches,
)

# One small byte-level corpus shared by the batch tests: 0..255 repeated, so a window's
# first token names its offset modulo 256.
DATA = TokenData(torch.arange(4096, dtype=torch.int64) % 256, 256, "ramp")


def test_stdlib_corpus_is_bytes_deterministic_and_capped() -> None:
    a, b = stdlib_corpus(200_000), stdlib_corpus(200_000)
    assert len(a) == 200_000 and a.vocab_size == 256
    assert torch.equal(a.tokens, b.tokens)
    assert int(a.tokens.max()) < 256 and int(a.tokens.min()) >= 0
    text = bytes(a.tokens.tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text


def test_stdlib_corpus_skips_tests_site_packages_and_non_utf8(tmp_path, monkeypatch) -> None:
    files = {
        "b.py": b"B",
        "a/z.py": b"AZ",
        "a/notes.txt": b"not python",
        "bad.py": b"\xff\xfe latin-1",
        "test/t.py": b"T",
        "idlelib/idle_test/i.py": b"I",
        "lib2to3/tests/l.py": b"L",
        "site-packages/s.py": b"S",
        "idlelib/run.py": b"RUN",
    }
    for name, raw in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(raw)
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": str(tmp_path)})
    assert bytes(stdlib_corpus(None).tokens.tolist()) == b"AZ\n\nB\n\nRUN"
    assert bytes(stdlib_corpus(5).tokens.tolist()) == b"AZ\n\nB"


def test_stdlib_corpus_default_size() -> None:
    assert 1_000_000 < len(stdlib_corpus()) <= 8_000_000


def test_text_corpus_folder_sorted_and_filtered(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"bee")
    (tmp_path / "sub" / "a.md").write_bytes(b"ay")
    (tmp_path / "data.bin").write_bytes(b"\x00\xff")  # not a text suffix: skipped
    data = text_corpus(tmp_path)
    assert bytes(data.tokens.tolist()) == b"bee\n\nay"  # 'b.txt' < 'sub/a.md'
    assert data.vocab_size == 256
    assert bytes(text_corpus(tmp_path / "b.txt").tokens.tolist()) == b"bee"


def test_text_corpus_folder_without_text_suffixes_reads_everything(tmp_path) -> None:
    (tmp_path / "x.dat").write_bytes(b"one")
    (tmp_path / "y").write_bytes(b"two")
    assert bytes(text_corpus(tmp_path).tokens.tolist()) == b"one\n\ntwo"


def test_token_file_memmap_and_vocab(tmp_path) -> None:
    path = tmp_path / "train.bin"
    np.array([5, 1000, 7, 65535, 2], dtype=np.uint16).tofile(path)
    data = token_file(path)
    assert isinstance(data.tokens, np.memmap)
    assert len(data) == 5 and data.vocab_size == 65536
    assert data.window(1, 4).tolist() == [1000, 7, 65535]
    assert data.window(0, 2).dtype == torch.int64
    assert token_file(path, vocab_size=70000).vocab_size == 70000
    x, y = batch(data, 0, 4, 2, seed=0)
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def test_load_dispatch_and_error(tmp_path) -> None:
    assert load(None).name.startswith("stdlib:") and load("stdlib").vocab_size == 256
    bin_path = tmp_path / "tokens.bin"
    np.arange(10, dtype=np.uint16).tofile(bin_path)
    assert load(str(bin_path)).vocab_size == 10
    (tmp_path / "t.txt").write_text("hello")
    assert load(str(tmp_path / "t.txt")).name.startswith("text:")
    assert load(str(tmp_path)).name.startswith("text:")
    with pytest.raises(AutoTPError, match=r"'nope\.bin'.*stdlib.*\.bin.*text file or folder"):
        load("nope.bin")


def test_split_is_contiguous() -> None:
    train, val = DATA.split(0.25)
    assert len(train) == 3072 and len(val) == 1024
    assert torch.equal(torch.cat([train.tokens, val.tokens]), DATA.tokens)
    with pytest.raises(ValueError, match="val_fraction"):
        DATA.split(1.0)


def _global(step: int, dp: int, micro_steps: int, seed: int = 0) -> torch.Tensor:
    """The rows all ranks and micro-batches of one step see, concatenated in rank order."""
    parts = [
        batch(DATA, step, 8, 16, seed=seed, dp_rank=r, dp_size=dp, micro=m, micro_steps=micro_steps)
        for r in range(dp)
        for m in range(micro_steps)
    ]
    for x, y in parts:
        assert x.shape == (8 // (dp * micro_steps), 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal((x[:, 0:1] + torch.arange(1, 17)) % 256, y)  # y is x shifted
    return torch.cat([x for x, _ in parts])


@given(
    step=st.integers(0, 1000),
    dp=st.sampled_from([1, 2, 4]),
    micro_steps=st.sampled_from([1, 2]),
)
def test_global_batch_independent_of_dp_and_micro(step, dp, micro_steps) -> None:
    assert torch.equal(_global(step, dp, micro_steps), _global(step, 1, 1))


def test_micro_batches_concatenate_to_the_dp_part() -> None:
    x, y = batch(DATA, 3, 8, 16, seed=1, dp_rank=1, dp_size=2)
    micro = [
        batch(DATA, 3, 8, 16, seed=1, dp_rank=1, dp_size=2, micro=m, micro_steps=4)
        for m in range(4)
    ]
    assert torch.equal(torch.cat([m[0] for m in micro]), x)
    assert torch.equal(torch.cat([m[1] for m in micro]), y)


def test_steps_and_seeds_differ_same_inputs_repeat() -> None:
    assert torch.equal(_global(5, 1, 1, seed=3), _global(5, 1, 1, seed=3))
    assert not torch.equal(_global(5, 1, 1), _global(6, 1, 1))
    assert not torch.equal(_global(5, 1, 1, seed=0), _global(5, 1, 1, seed=1))


def test_batch_refusals() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        batch(DATA, 0, 6, 16, seed=0, dp_size=4)
    with pytest.raises(ValueError, match="not divisible"):
        batch(DATA, 0, 8, 16, seed=0, dp_size=2, micro_steps=3)
    with pytest.raises(ValueError, match="fewer than seq"):
        batch(TokenData(torch.arange(10), 256, "short"), 0, 2, 10, seed=0)


def test_val_batches_cover_the_data_in_order() -> None:
    data = TokenData(torch.arange(101), 101, "val")
    batches = list(val_batches(data, seq=10, batch_size=3))
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    xs = torch.cat([x for x, _ in batches]).reshape(-1)
    ys = torch.cat([y for _, y in batches]).reshape(-1)
    assert torch.equal(xs, torch.arange(100)) and torch.equal(ys, torch.arange(1, 101))
    assert len(list(val_batches(data, 10, 3, max_batches=2))) == 2
    assert len(list(val_batches(data, 10, 3, drop_last=True))) == 3
