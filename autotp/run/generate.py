"""`autotp generate RUN --prompt TEXT`: sample from a run's checkpoint under tensor parallelism.

    autotp generate runs/a --prompt "def main(" --tokens 200            # tp=1, this process
    autotp generate runs/a --prompt "import " --temperature 0 --tp 2    # greedy, 2 ranks

The run's latest complete checkpoint is loaded as `autotp eval` loads it (the serial model
with its weights, whatever tp it was trained at) and split at `--tp`: in this process at
tp=1, over `--tp` processes started through torchrun (`torchrun -m autotp.run.generate`)
otherwise, each rank building its shards with `autotp.parallelize`. The prompt is encoded
as bytes; each new token is drawn from the last position's logits (only the byte ids
0..255: the run trained on bytes), by a torch.Generator seeded from `--seed` on every rank,
so every rank draws the same token; `--temperature 0` is greedy. A transformers model keeps
its KV cache (each rank its own heads): each new token runs alone against it, so a token
costs the same at any context, until the window reaches the model's positions and is
cropped (the cache then starts over). autotp's own models keep no cache: each step runs
the model over the whole window again (the last `context` ids).

Rank 0 prints the prompt and then the continuation as it is drawn, decoded as UTF-8 with
undecodable bytes replaced. A masked-LM (`--objective mlm`) run cannot continue a prompt
and is refused, as is a run trained on a token file (its ids are not bytes).
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
from collections.abc import Callable
from typing import Any, cast

import torch

from ..common.errors import UsageError
from .config import UsageParser, _Help

__all__ = ["parser", "sample", "check", "generate", "main", "run", "CachedLogits"]

BYTES = 256  # the ids a byte-level run's text is made of


def parser() -> argparse.ArgumentParser:
    ap = UsageParser(
        prog="autotp generate",
        description="Continue a prompt with a trained run's model, split over --tp ranks "
        "(any tp, whatever the run was trained at). Byte-level runs of a causal LM only. "
        "A transformers model runs each new token against its KV cache; autotp's own "
        "models run the whole window again (the prompt and what was drawn, cropped to the "
        "model's positions).",
        formatter_class=_Help,
    )
    ap.add_argument("run", metavar="RUN_DIR", help="a run's --ckpt-dir (its latest "
                    "checkpoint) or one of its step_N folders")  # fmt: skip
    ap.add_argument("--prompt", required=True, metavar="TEXT",
                    help="the text to continue (encoded as UTF-8)")  # fmt: skip
    ap.add_argument("--tokens", type=int, default=200, metavar="N",
                    help="new tokens (bytes) to draw")  # fmt: skip
    ap.add_argument("--temperature", type=float, default=0.8, metavar="T",
                    help="divides the logits before sampling; 0: greedy (argmax)")  # fmt: skip
    ap.add_argument("--top-k", type=int, default=0, metavar="K",
                    help="sample among the K likeliest tokens only (0: all)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, metavar="S",
                    help="seeds the sampling generator, the same on every rank")  # fmt: skip
    ap.add_argument("--tp", type=int, default=1, metavar="N",
                    help="tensor-parallel ranks (torchrun when >1)")  # fmt: skip
    return ap


@torch.no_grad()
def sample(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt: list[int],
    *,
    tokens: int,
    temperature: float,
    top_k: int = 0,
    seed: int = 0,
    context: int,
    vocab: int = BYTES,
    on_token: Callable[[int], None] | None = None,
    device: torch.device | str | None = None,
) -> list[int]:
    """`tokens` ids drawn one at a time after `prompt`: each from the logits of the last
    position of `logits_fn(ids [1, T]) -> [1, T, V]` over the last `context` ids, restricted
    to ids below `vocab`; greedy at temperature 0, else softmax(logits / temperature) over
    the `top_k` likeliest (0: all), drawn by a CPU generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    drawn: list[int] = []
    for _ in range(tokens):
        window = torch.tensor([ids[-context:]], dtype=torch.long, device=device)
        logits = logits_fn(window)[0, -1, :vocab].double().cpu()  # (vocab,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        ids.append(token)
        drawn.append(token)
        if on_token is not None:
            on_token(token)
    return drawn


def _check_options(args: argparse.Namespace) -> None:
    if args.tokens < 1 or args.tp < 1 or args.top_k < 0:
        raise UsageError(
            f"--tokens {args.tokens}, --tp {args.tp}, --top-k {args.top_k}: --tokens and --tp "
            "must be at least 1, --top-k at least 0"
        )
    if not (0 <= args.temperature < math.inf):
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or positive")
    if not args.prompt:
        raise UsageError(
            "--prompt is empty", hint='give the text to continue, e.g. --prompt "def "'
        )


def _check_run(args: argparse.Namespace, meta: dict[str, Any], model: torch.nn.Module) -> None:
    """A causal LM trained on bytes: what generate can continue a prompt with."""
    from .objective import default_objective

    data = meta.get("data") or "stdlib"
    if str(data).endswith(".bin"):
        raise UsageError(
            f"{args.run} was trained on the token file {data}, whose ids are not bytes: "
            "autotp generate reads and writes byte-level text only",
            hint="generate from a run trained on text (--data a text file or folder)",
        )
    if (meta.get("objective") or default_objective(model)) == "mlm":
        raise UsageError(
            f"{args.run} holds a masked language model ({meta['model']}, trained with "
            "--objective mlm): it fills in [MASK] positions from both sides and cannot "
            "continue a prompt",
            hint="generate from a run trained with --objective clm (a GPT-style --model, "
            "e.g. autotp train --model gpt2-bytes)",
        )


def _context(model: torch.nn.Module, meta: dict[str, Any]) -> int:
    conf = getattr(model, "config", None)
    longest = getattr(conf, "block_size", None) or getattr(conf, "max_position_embeddings", None)
    return int(longest or meta.get("seq") or 1024)


def _inputs(model: torch.nn.Module, rows: int, seq: int) -> dict[str, torch.Tensor]:
    """Token ids only, under the name forward gives its first input: the graph is traced
    without targets or labels, so it returns logits and computes no loss."""
    import inspect

    first = next(iter(inspect.signature(model.forward).parameters))
    device = next(iter(model.parameters()), torch.empty(0)).device
    return {first: torch.zeros(rows, seq, dtype=torch.long, device=device)}


def check(args: argparse.Namespace, *, split: bool = True) -> None:
    """Everything that can be checked before any weight is read or torchrun starts a
    worker: the options, the run, its objective and data, and (`split`) that --tp splits
    the model, planned on the meta device."""
    from ..parallel import plan
    from .checkpoint import find_checkpoint
    from .metrics import say
    from .resolve import build, trusted_factory

    _check_options(args)
    path, meta = find_checkpoint(args.run, say=say)
    trusted_factory(meta["model"], path, say)
    model = build(meta["model"], meta=True, seed=meta.get("seed"))
    _check_run(args, meta, model)
    if split:
        plan(model, args.tp, _inputs(model, 2, min(8, _context(model, meta))))


def generate(
    args: argparse.Namespace, write: Callable[[str], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> str:  # fmt: skip
    """Load the run, split it over this process group's ranks (args.tp; none needed at
    tp=1), draw the continuation and return it decoded; `write` (rank 0's) receives the
    prompt and then each decoded piece as it is drawn, `say` what loading tells."""
    import autotp

    from .checkpoint import serial_model

    _check_options(args)
    model, meta = serial_model(args.run, say=say or (lambda line: None))
    _check_run(args, meta, model)
    context = _context(model, meta)
    device = torch.device(
        f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    )
    p = autotp.plan(model, args.tp, _inputs(model, 2, min(8, context)))
    module = autotp.parallelize(model, p).to(device)
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    if isinstance(p, autotp.RegionPlan) and _takes_cache(module):
        logits_fn = CachedLogits(module)
    else:

        def logits_fn(ids: torch.Tensor) -> torch.Tensor:
            out = module(ids)
            if hasattr(out, "logits"):
                return cast(torch.Tensor, out.logits)
            return cast(torch.Tensor, out[0] if isinstance(out, (tuple, list)) else out)

    prompt = list(args.prompt.encode())
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []

    def on_token(token: int) -> None:
        piece = decoder.decode(bytes([token]))
        pieces.append(piece)
        if write is not None and piece:
            write(piece)

    if write is not None:
        write(args.prompt)
    sample(logits_fn, prompt, tokens=args.tokens, temperature=args.temperature,
           top_k=args.top_k, seed=args.seed, context=context, on_token=on_token,
           device=device)  # fmt: skip
    tail = decoder.decode(b"", final=True)
    pieces.append(tail)
    if write is not None:
        write(tail + "\n")
    return "".join(pieces)


def _takes_cache(model: torch.nn.Module) -> bool:
    """A transformers model that can keep a KV cache (whatever its config's use_cache,
    which training turns off)."""
    import inspect

    takes = inspect.signature(model.forward).parameters
    return "use_cache" in takes and ("cache" in takes or "past_key_values" in takes)


class CachedLogits:
    """`logits_fn` over a transformers model's KV cache: a window that extends the last one
    runs only its new ids against the cache, so a token costs the same at any context;
    any other window (the first, or one cropped to the model's positions) starts a new
    cache from the whole window. The logits are of the ids run (the last one last)."""

    def __init__(self, module: torch.nn.Module) -> None:
        import inspect

        self.module = module
        params = inspect.signature(module.forward).parameters
        self.key = "cache" if "cache" in params else "past_key_values"
        self.cache: object = None
        self.seen: list[int] = []

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        ids = window[0].tolist()
        n = len(self.seen)
        if self.cache is not None and len(ids) > n and ids[:n] == self.seen:
            out = self.module(input_ids=window[:, n:], use_cache=True, **{self.key: self.cache})
        else:
            out = self.module(input_ids=window, use_cache=True)
        self.cache = getattr(out, self.key, None)
        self.seen = ids
        return cast(torch.Tensor, out.logits)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(argv: list[str]) -> int:
    """`autotp generate ARGV`: at --tp 1 in this process, otherwise over --tp torchrun
    workers (after the checks, so a mistake is one panel before any process starts)."""
    args = parser().parse_args(argv)
    check(args, split=args.tp > 1)  # before any weight is read
    if args.tp == 1:
        with torch.no_grad():
            generate(args, write=_stdout)
        return 0
    from .launch import run_workers

    return run_workers("autotp.run.generate", [], argv, args.tp, say=lambda line: None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one worker started by torchrun (`torchrun -m autotp.run.generate`)."""
    from .train import run_worker

    return run_worker(lambda: parser().parse_args(argv), _generate_on_rank)


def _generate_on_rank(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    if dist.get_world_size() != args.tp:
        raise UsageError(
            f"--tp {args.tp}, but {dist.get_world_size()} processes were started",
            hint=f"start --tp processes (torchrun --nproc-per-node {args.tp})",
        )
    with torch.no_grad():
        generate(args, write=_stdout if dist.get_rank() == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
