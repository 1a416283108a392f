"""The `autotp` command (also `python -m autotp`).

    autotp show MODEL --tp N [--batch B --seq T] [--graph | --diff --layer K |
                               --unmatched | --json] [--svg FILE] [--width W]
    autotp train [torchrun options] [training options]      (autotp train --help)
    autotp export CKPT OUT                                  (serial state_dict)
    autotp eval CKPT [--text FILE] [--lambada FILE]         (perplexity, last-word accuracy)
    autotp generate RUN_DIR --prompt TEXT [--tokens N] [--temperature T] [--top-k K]
                    [--seed S] [--tp N]                     (continue a prompt, any tp)

MODEL is a named configuration from autotp.models (gpt2, gpt2-xl, bert-large,
megatron-8.3b, ...), `hf:gpt2` / `hf:bert` / `hf:llama` (a transformers architecture from its
default config, offline), `minilm` (the real all-MiniLM-L6-v2 weights), or
`path/to/file.py:factory` (your own model: `factory()` returns it; see
autotp.run.resolve). Named and hf: models are built on the meta device, so the 8.3B
configuration renders in seconds with no weights allocated.

A user's mistake exits 2 with one panel that says what to change; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..common.errors import AutoTPError, ExampleInputsError, UsageError
from ..parallel import plan
from ..planning.region_plan import RegionPlan
from ..show import render, report
from .config import UsageParser
from .metrics import say as _say
from .resolve import build, canonical, example_inputs, input_specs, logits

__all__ = ["main", "load_model"]


def load_model(
    spec: str, batch: int, seq: int, inputs: list[str] | None = None
) -> tuple[torch.nn.Module, Any]:
    """The model MODEL names, and example inputs: the `--input NAME=SHAPE:DTYPE` options
    given, else the model's own, else batch x seq token ids. Named and hf: models are
    built on the meta device; a factory's model is built as it returns it."""
    from autotp.models import CONFIGS

    spec = canonical(spec)
    meta = spec in CONFIGS or spec.startswith("hf:")
    model = build(spec, meta=meta)
    if inputs:
        return model, input_specs(model, inputs)
    x = example_inputs(model, batch, seq)
    if x is None:
        sig = inspect.signature(model.forward)
        raise UsageError(
            f"autotp cannot make example inputs for {type(model).__name__}.forward{sig}: it "
            "has no example_inputs() method and no token embedding",
            hint="describe each input: --input NAME=SHAPE:DTYPE (repeatable), e.g. "
            f"--input {next(iter(sig.parameters), 'x')}=2x16x64:float",
        )
    return model, x


def _show(args: argparse.Namespace, console: Console) -> int:
    model, inputs = load_model(args.model, args.batch, args.seq, args.input)
    with console.status(f"planning {args.model} over tp={args.tp}…", spinner="dots"):
        try:
            p = plan(model, args.tp, inputs, strict=args.strict, sequence_parallel=args.sp)
        except ExampleInputsError as e:  # in the words of this command: its flags
            raise _in_flags(e, args) from e
    if isinstance(p, RegionPlan):  # a model that keeps its own Python: what parallelize runs
        if args.json:
            console.print_json(json.dumps(report.regions_json(p)))
            return 0
        if not (args.diff or args.graph or args.unmatched):
            console.print(render.region_summary(p))
            return 0
        k = args.layer or 0  # the graph views: of region K (the first decoder layer)
        if not 0 <= k < len(p.regions):
            raise UsageError(f"--layer {k}: the plan has regions 0..{len(p.regions) - 1}")
        p = p.regions[k].plan
        args.layer = None
    if args.json:
        console.print_json(json.dumps(report.to_json(p)))
        return 0
    if args.diff:
        view: Any = render.diff_view(p, args.layer)
    elif args.graph:
        view = render.graph_view(p, args.layer)
    elif args.unmatched:
        view = render.unmatched_view(p)
    else:
        view = render.summary(p)
    console.print(view)
    return 0


def _in_flags(e: ExampleInputsError, args: argparse.Namespace) -> ExampleInputsError:
    """The refusal of the example inputs, with a hint that names show's own flags."""
    given = (
        " ".join(f"--input {i}" for i in args.input)
        if args.input
        else f"--batch {args.batch} --seq {args.seq}"
    )
    hint = (
        f"the example inputs came from {given}: give sizes the model takes, e.g. a "
        "shorter --seq (its positions), another --batch, or describe each input with "
        "--input NAME=SHAPE:DTYPE (e.g. --input idx=2x16:long)"
    )
    return ExampleInputsError(e.message, what=e.what, where=e.where, hint=hint, node=e.node)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autotp", description="Automatic tensor parallelism.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train over a TP x DP mesh (torchrun)"),
                       ("export", "a checkpoint as the serial state_dict"),
                       ("eval", "perplexity and last-word accuracy of a checkpoint"),
                       ("generate", "continue a prompt with a trained model, any tp")):  # fmt: skip
        sub.add_parser(name, help=text, add_help=False)
    show = sub.add_parser("show", help="read the rewritten graph in the terminal")
    show.add_argument("model", help="a named model, hf:NAME, minilm, or file.py:factory")
    show.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (default 2)")
    show.add_argument("--batch", type=int, default=8, help="batch size for the byte counts")
    show.add_argument("--seq", type=int, default=64, help="sequence length for the byte counts")
    show.add_argument(
        "--input", action="append", metavar="NAME=SHAPE:DTYPE",
        help="an example input of the model's forward, e.g. idx=2x16:long or x=2x16x64:float "
        "(repeatable; default: the model's example_inputs(), else --batch x --seq token ids "
        "of its first embedding)",
    )  # fmt: skip
    views = show.add_mutually_exclusive_group()
    views.add_argument("--graph", action="store_true", help="the per-rank graph, node by node")
    views.add_argument("--diff", action="store_true", help="serial and rewritten layer K")
    views.add_argument("--unmatched", action="store_true", help="layers left replicated, why")
    views.add_argument("--json", action="store_true", help="the plan as JSON")
    show.add_argument("--layer", type=int, default=None,
                      help="layer K for --diff / --graph (of a transformers model: its "
                      "region K, in the order the summary lists them)")  # fmt: skip
    show.add_argument("--svg", metavar="FILE", help="also save the view as an SVG picture")
    show.add_argument("--width", type=int, default=None, help="terminal width")
    show.add_argument("--strict", action="store_true",
                      help="refuse a matched block whose split cannot be proven, instead of "
                      "leaving it replicated")  # fmt: skip
    show.add_argument("--sp", action="store_true",
                      help="plan with sequence parallelism (the regions between blocks split "
                      "along the sequence)")  # fmt: skip
    return ap


def _train(argv: list[str]) -> int:
    from .launch import launch

    return launch(argv)


def _export(argv: list[str]) -> int:
    from .checkpoint import export

    ap = UsageParser(prog="autotp export", description="a checkpoint as the serial state_dict")
    ap.add_argument("ckpt", help="a run's checkpoint folder (its latest) or one step_N folder")
    ap.add_argument("out", help="OUT.safetensors or OUT.pt")
    args = ap.parse_args(argv)
    path = export(args.ckpt, args.out, say=_say)
    _say(f"wrote {path}: loads into the unmodified model")
    return 0


def _eval(argv: list[str]) -> int:
    from . import data as data_mod
    from .checkpoint import serial_model
    from .evaluate import lambada_file, last_word_accuracy, sliding_window_perplexity
    from .objective import default_objective, masked_perplexity

    ap = UsageParser(
        prog="autotp eval",
        description="evaluate a checkpoint; with neither --text nor --lambada, on the "
        "validation split of the data it was trained on",
    )
    ap.add_argument("ckpt", help="a run's checkpoint folder (its latest) or one step_N folder")
    ap.add_argument("--text", help="a text file: sliding-window perplexity (bytes)")
    ap.add_argument("--lambada", help="passages, one a line: last-word accuracy")
    ap.add_argument("--context", type=int, default=None,
                    help="window (default: the sequence length it was trained at)")  # fmt: skip
    ap.add_argument("--stride", type=int, default=None, help="window step (default: half)")
    ap.add_argument("--tokens", type=int, default=65536,
                    help="score the first N tokens of the run's validation split (default "
                    "65536; 0: all of it)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=16, help="windows per forward (default 16)")
    args = ap.parse_args(argv)
    if args.tokens < 0 or args.batch < 1:
        raise UsageError("--tokens must be at least 0 and --batch at least 1")
    model, meta = serial_model(args.ckpt, say=_say)
    conf = getattr(model, "config", None)
    longest = getattr(conf, "block_size", None) or getattr(conf, "max_position_embeddings", None)
    context = args.context or meta.get("seq") or longest
    if context is None:
        raise UsageError("the model does not say its longest input", hint="pass --context N")
    if context < 1 or (longest and context > longest):
        raise UsageError(f"--context {context}: must be in [1, {longest}], the model's positions")
    stride = context // 2 if args.stride is None else args.stride
    if not 1 <= stride <= context:
        raise UsageError(f"--stride {stride}: must be in [1, --context {context}]")

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return logits(model, ids)

    masked = (meta.get("objective") or default_objective(model)) == "mlm"
    if masked and args.lambada:
        raise UsageError(
            f"{args.ckpt} holds a masked language model (--objective mlm): last-word accuracy "
            "is a causal LM's measure",
            hint="drop --lambada; --text FILE and the "
            "run's validation split give its masked-token perplexity",
        )

    def score(tokens: torch.Tensor) -> tuple[float, int]:
        if not masked:
            return sliding_window_perplexity(logits_fn, tokens, context, stride,
                                             batch_size=args.batch)  # fmt: skip
        mask_id = meta.get("mask_id") or 256  # the first id past the data's
        return masked_perplexity(logits_fn, tokens, context, seed=meta.get("seed") or 0,
                                 mask_id=mask_id, vocab=mask_id, batch_size=args.batch)  # fmt: skip

    kind, scored = (
        ("masked-token perplexity", "masked tokens") if masked else ("perplexity", "tokens")
    )
    console = Console()
    if not args.text and not args.lambada:
        where = meta.get("data") or "stdlib"
        try:
            val = data_mod.load(meta.get("data")).split(0.05)[1]
        except (AutoTPError, OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"the run's data {where} cannot be read: {e}",
                             hint="pass --text FILE") from e  # fmt: skip
        tokens = val.window(0, min(len(val), args.tokens or len(val)))
        if masked and len(tokens) < context:
            raise UsageError(f"{len(tokens)} validation tokens, fewer than one window of "
                             f"{context}", hint="pass a smaller --context")  # fmt: skip
        ppl, n = score(tokens)
        console.print(f"validation {kind} {ppl:.3f} over {n:,} {scored} of {where} "
                      f"(context {context}, of {len(val):,} held out)")  # fmt: skip
    if args.text:
        tokens = torch.tensor(list(_read(args.text, "--text")), dtype=torch.long)
        if len(tokens) < (context if masked else 2):
            raise UsageError(f"--text {args.text} holds {len(tokens)} bytes: nothing to score"
                             + (f" (a masked LM reads windows of --context {context})"
                                if masked else ""))  # fmt: skip
        ppl, n = score(tokens)
        console.print(f"{kind} {ppl:.3f} over {n:,} {scored} (context {context})")
    if args.lambada:
        _read(args.lambada, "--lambada")
        try:
            passages, targets = lambada_file(args.lambada)
            acc = last_word_accuracy(logits_fn, passages, targets, context=context)
        except (ValueError, KeyError) as e:  # UnicodeDecodeError is a ValueError
            raise UsageError(f"--lambada {args.lambada}: {e}") from e
        console.print(f"last-word accuracy {acc:.3%} over {len(passages)} passages")
    return 0


def _generate(argv: list[str]) -> int:
    from .generate import run

    return run(argv)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from e


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": _train, "export": _export, "eval": _eval, "generate": _generate}
    err = Console(stderr=True)
    try:
        if argv and argv[0] in commands:
            with torch.no_grad() if argv[0] == "eval" else contextlib.nullcontext():
                return commands[argv[0]](argv[1:])
        return _show_main(argv)
    except AutoTPError as e:
        err.print(render.error_view(e))
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def _show_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    console = Console(width=args.width, record=bool(getattr(args, "svg", None)))
    err = Console(stderr=True, width=args.width)
    if args.command == "show" and args.diff and args.layer is None:
        args.layer = 0
    try:
        code = _show(args, console)
    except IndexError as e:
        raise UsageError(str(e)) from e
    if args.svg:
        console.save_svg(args.svg, title=f"autotp show {args.model} --tp {args.tp}")
        err.print(f"saved {args.svg}")
    return code


if __name__ == "__main__":
    sys.exit(main())
