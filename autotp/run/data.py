"""Token data for training and its deterministic batches; nothing is ever downloaded.

    data = load(None)                       # the Python standard library, byte-level
    train, val = data.split(0.05)           # contiguous: the last 5% is validation
    x, y = batch(train, step, 32, 256, seed=0, dp_rank=r, dp_size=2, micro=m, micro_steps=4)

Sources: `stdlib_corpus` (the default, present wherever Python is), `text_corpus` (a file
or folder of text) and `token_file` (a nanoGPT/Megatron flat uint16 file, memory-mapped).
The global batch of a step depends only on (seed, step), never on the data-parallel size:
a run at dp=2 sees exactly the rows a serial run sees, split in contiguous halves.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..common.errors import AutoTPError

__all__ = [
    "TokenData",
    "stdlib_corpus",
    "text_corpus",
    "token_file",
    "load",
    "batch",
    "val_batches",
]

_SEPARATOR = b"\n\n"
_TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
# Folders of the stdlib tree that are not the library itself. Pruned by name at any depth;
# this covers test/, tests/, idlelib/idle_test and lib2to3/tests.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class TokenData:
    """A 1-D token sequence: a uint8 tensor for byte-level text, or a lazily read
    np.uint16 memmap for token files. Read it through `window`/`windows`, which return
    int64; `tokens` itself keeps its compact storage dtype."""

    tokens: Any  # torch.Tensor (1-D, integer) or numpy.memmap (1-D, uint16)
    vocab_size: int
    name: str

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) as an int64 tensor."""
        return _to_long(self.tokens[start:stop])

    def windows(self, offsets: torch.Tensor, length: int) -> torch.Tensor:
        """Rows of `length` tokens starting at each offset, as int64 [len(offsets), length]."""
        idx = offsets.reshape(-1, 1) + torch.arange(length)
        if isinstance(self.tokens, torch.Tensor):
            return self.tokens[idx].long()
        return _to_long(self.tokens[idx.numpy()])  # fancy indexing reads only these rows

    def split(self, val_fraction: float = 0.05) -> tuple[TokenData, TokenData]:
        """(train, val): contiguous, the last `val_fraction` of the tokens is validation."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n = len(self)
        n_val = max(1, int(n * val_fraction))
        if n_val >= n:
            raise ValueError(
                f"{self.name} has {n} tokens: too few to split off {val_fraction} for validation"
            )
        cut = n - n_val
        return (
            TokenData(self.tokens[:cut], self.vocab_size, f"{self.name}[train]"),
            TokenData(self.tokens[cut:], self.vocab_size, f"{self.name}[val]"),
        )


def _to_long(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.long()
    import numpy as np

    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _bytes_data(raw: bytes, name: str) -> TokenData:
    if not raw:
        raise AutoTPError(f"{name} holds no text: nothing to train on")
    return TokenData(torch.frombuffer(bytearray(raw), dtype=torch.uint8), 256, name)


def stdlib_corpus(max_bytes: int | None = 8_000_000) -> TokenData:
    """The standard library's own .py files as byte-level tokens (vocab 256): sorted paths,
    tests and site-packages skipped, files that are not UTF-8 skipped, joined by a blank
    line, truncated to `max_bytes` (None: all of it)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]
        paths += [Path(folder, f) for f in files if f.endswith(".py")]
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    chunks, size = [], 0
    for path in paths:
        if max_bytes is not None and size >= max_bytes:
            break
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        chunks.append(raw)
        size += len(raw) + len(_SEPARATOR)
    raw = _SEPARATOR.join(chunks)[:max_bytes]
    return _bytes_data(raw, f"stdlib:{root}")


def text_corpus(path: str | Path) -> TokenData:
    """A text file, or a folder of them, as byte-level tokens (vocab 256). A folder is read
    recursively in sorted order: its .txt .md .py .rst files, or every file if it has none
    of those; files are joined by a blank line."""
    path = Path(path)
    if path.is_file():
        return _bytes_data(path.read_bytes(), f"text:{path}")
    if not path.is_dir():
        raise AutoTPError(f"text corpus {path} is neither a file nor a folder")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    texts = [p for p in files if p.suffix in _TEXT_SUFFIXES] or files
    raw = _SEPARATOR.join(p.read_bytes() for p in texts)
    return _bytes_data(raw, f"text:{path}")


def token_file(path: str | Path, vocab_size: int | None = None) -> TokenData:
    """A flat uint16 token file (nanoGPT's train.bin, Megatron-style), memory-mapped: only the
    rows a batch needs are read. `vocab_size` defaults to the largest token + 1."""
    import numpy as np

    path = Path(path)
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise AutoTPError(
            f"token file {path} has {size} bytes: a uint16 token file has a positive, even "
            "number of bytes (was it written with np.uint16?)"
        )
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if vocab_size is None:
        chunk = 1 << 24
        vocab_size = 1 + max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))
    return TokenData(tokens, int(vocab_size), f"tokens:{path}")


def load(spec: str | None) -> TokenData:
    """None or 'stdlib': the standard library; 'X.bin': a uint16 token file; an existing
    file or folder: byte-level text."""
    if spec is None or spec == "stdlib":
        return stdlib_corpus()
    path = Path(spec)
    if path.suffix == ".bin" and path.is_file():
        return token_file(path)
    if path.exists():
        return text_corpus(path)
    raise AutoTPError(
        f"data {spec!r} is not a known source. Accepted: 'stdlib' (or none) for the Python "
        "standard library's source, a path to a uint16 token file ending in .bin, or an "
        "existing text file or folder of text files."
    )


def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step): splitmix64 of each, combined."""

    def splitmix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    return splitmix(splitmix(seed & 0xFFFFFFFFFFFFFFFF) ^ (step & 0xFFFFFFFFFFFFFFFF)) >> 1


def batch(
    data: TokenData,
    step: int,
    global_batch: int,
    seq: int,
    *,
    seed: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    micro: int = 0,
    micro_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch of optimizer step `step`, as int64 (x, y) of [rows, seq] with
    y = x shifted by one token.

    The global batch is `global_batch` random windows of seq + 1 tokens drawn from (seed,
    step) alone. DP rank r takes rows [r*B/dp, (r+1)*B/dp); micro-batch m takes the m-th of
    `micro_steps` contiguous parts of those."""
    if global_batch % (dp_size * micro_steps):
        raise ValueError(
            f"global_batch={global_batch} is not divisible by dp_size * micro_steps = "
            f"{dp_size} * {micro_steps}: each rank's micro-batches must be the same size"
        )
    if not 0 <= dp_rank < dp_size or not 0 <= micro < micro_steps:
        raise ValueError(
            f"dp_rank={dp_rank} must be in [0, {dp_size}) and micro={micro} in [0, {micro_steps})"
        )
    if len(data) < seq + 1:
        raise ValueError(f"{data.name} has {len(data)} tokens, fewer than seq + 1 = {seq + 1}")
    gen = torch.Generator().manual_seed(_mix(seed, step))
    offsets = torch.randint(0, len(data) - seq, (global_batch,), generator=gen)
    rows = global_batch // (dp_size * micro_steps)
    start = (dp_rank * micro_steps + micro) * rows
    xy = data.windows(offsets[start : start + rows], seq + 1)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # models .view() them


def val_batches(
    data: TokenData,
    seq: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive, non-overlapping windows over `data` in order, batch_size at a time:
    window i is x = tokens[i*seq : (i+1)*seq], y the same shifted by one, so every token
    but the first is a target exactly once. The last batch may be smaller unless
    `drop_last`."""
    n_windows = (len(data) - 1) // seq
    if n_windows == 0:
        raise ValueError(f"{data.name} has {len(data)} tokens, fewer than seq + 1 = {seq + 1}")
    starts = torch.arange(n_windows) * seq
    for i, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        offsets = starts[first : first + batch_size]
        if drop_last and len(offsets) < batch_size:
            return
        xy = data.windows(offsets, seq + 1)
        yield xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
