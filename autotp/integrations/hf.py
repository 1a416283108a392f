"""What autotp knows of transformers models, in one place: whether a module is (or wraps)
one, and whether an attribute is its config; which of its modules are the vocabulary's
(the input embedding and the output head, as the model itself declares them), so that the
region machinery can split them along the vocabulary without guessing from names or
sizes; its cache objects (which ones, a layer's past keys and values, an encoder-decoder
cache of the layers' own making); the hooks it installs to collect outputs; and its
`save_pretrained`, given the gathered serial state; and how its masks are decided while
it runs on meta under torch.export to show how it calls its layers. The region machinery
asks these questions and knows nothing else of transformers; a model that is not a transformers
model answers none. (How a checkpoint's keys map to the model's is in hf_keys.)"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..common.errors import AutoTPError
from ..common.hooks import HOOKS
from ..common.tensor_names import common_prefix, names_by_tensor

__all__ = [
    "transformers_model", "is_region_model", "VocabRegions", "vocab_regions", "is_cache",
    "is_encoder_decoder", "self_cache", "collects", "collecting_inside", "drop_collectors",
    "is_config", "past_of", "encoder_decoder_cache", "SaveGathered", "gathering_save",
    "eager_masks",
]  # fmt: skip

_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")  # update = cat along seq


def is_cache(v: object) -> bool:
    """A transformers cache: a DynamicCache, or an encoder-decoder's pair of them."""
    if not type(v).__module__.startswith("transformers."):
        return False
    return (hasattr(v, "update") and hasattr(v, "layers")) or is_encoder_decoder(v)


@contextlib.contextmanager
def eager_masks() -> Iterator[None]:
    """transformers' mask functions decide as in an eager call of the usual kind while the
    model runs under torch.export on meta (to show how it calls its layers), where they
    cannot read a value and so build a full mask: position ids are taken as one sequence
    per row (not packed), and with no padding mask the causal mask is left to SDPA (None).
    A padding mask given (its values unknown) is still built. This only predicts which
    call pattern to plan ahead, so that the model's first real call plans nothing again;
    a real call of another pattern (padding, packed rows) is planned when it comes."""
    masking = sys.modules.get("transformers.masking_utils")
    eager: dict[str, Callable[..., Any]] = {
        "is_torchdynamo_exporting": lambda: False,
        "find_packed_sequence_indices": lambda position_ids: None,
    }
    if masking is None or not all(hasattr(masking, n) for n in eager):  # another version
        yield
        return
    saved = {n: getattr(masking, n) for n in eager}
    for n, f in eager.items():
        setattr(masking, n, f)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(masking, n, f)


def is_encoder_decoder(v: object) -> bool:
    """transformers' EncoderDecoderCache: a self-attention and a cross-attention cache."""
    return hasattr(v, "self_attention_cache") and hasattr(v, "cross_attention_cache")


def self_cache(cache: Any) -> Any:
    """The cache of a layer's own keys and values (an encoder-decoder's self-attention)."""
    return cache.self_attention_cache if is_encoder_decoder(cache) else cache


def past_of(cache: Any, index: int, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The past keys and values of layer `index` (of class `kind`) in the model's cache,
    or None before its first token; refused for a cache whose layers autotp cannot keep
    split by heads."""
    layers = getattr(self_cache(cache), "layers", None)
    layer = layers[index] if layers is not None and len(layers) > index else None
    if layers is None or (layer is not None and (
        type(layer).__name__ not in _CACHE_LAYERS or getattr(layer, "record_past", False)
    )):  # fmt: skip
        held = type(layer).__name__ if layer is not None else "no layers"
        raise AutoTPError(
            f"{type(cache).__name__} ({held}) is not a cache autotp can keep split by "
            f"heads for {kind} (it keeps DynamicCache's dynamic and sliding-window "
            "layers)",
            hint="use the default cache, or call the model with use_cache=False",
        )
    if layer is None or not getattr(layer, "is_initialized", False):
        return None
    if layer.keys.shape[-2] == 0:
        return None
    return layer.keys, layer.values


def encoder_decoder_cache(own: Any, cross: Any) -> Any:
    """An EncoderDecoderCache (an instance of its class, as the layers check) of two
    caches of the caller's making: the layers' own keys and values, and the cross
    attention's."""
    from transformers.cache_utils import EncoderDecoderCache

    obj = EncoderDecoderCache.__new__(EncoderDecoderCache)
    obj.__dict__.update(self_attention_cache=own, cross_attention_cache=cross, is_updated={})
    return obj


@functools.cache
def _is_config_type(kind: type) -> bool:
    return any(c.__name__ == "PretrainedConfig" and c.__module__.startswith("transformers.")
               for c in kind.__mro__)  # fmt: skip


def is_config(v: object) -> bool:
    """A transformers config (its plain values are what a layer reads of it)."""
    kind: type = type(v)
    return _is_config_type(kind)


def collects(hook: object) -> bool:
    """A hook transformers installs to collect hidden states or attentions."""
    return getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def collecting_inside() -> str | None:
    """What transformers is collecting from inside the regions (attentions, router logits)
    in the current forward, or None: hooks inside a region never run in its parallel form."""
    capture = sys.modules.get("transformers.utils.output_capturing")
    active = getattr(getattr(capture, "_active_collector", None), "get", lambda: None)()
    inside = [k for k in (active or {}) if not k.startswith("_") and k != "hidden_states"]
    return inside[0] if inside else None


def drop_collectors(model: nn.Module) -> None:
    """Remove the hooks transformers installed to collect outputs (copied with the serial
    model): it installs them again on the parallel model, on its regions."""
    for m in model.modules():
        for attr in HOOKS:
            hooks = getattr(m, attr)
            for key in [k for k, h in hooks.items() if collects(h)]:
                del hooks[key]
        m.__dict__.pop("_output_capturing_hooks_installed", None)


def _is_pretrained(m: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(m).__mro__)  # fmt: skip


def transformers_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The transformers model `model` is or wraps (a SentenceTransformer holds one), with
    its path, or None."""
    return next(((p, m) for p, m in model.named_modules() if _is_pretrained(m)), None)


def is_region_model(model: nn.Module) -> bool:
    """A transformers model, or a module wrapping one (its Python builds masks, caches and
    outputs around regions)."""
    return transformers_model(model) is not None


@dataclass(frozen=True)
class VocabRegions:
    """The model's vocabulary modules as regions: `embeddings` (every nn.Embedding holding
    the input embedding's table: an encoder-decoder's shared table sits in three) and
    `head` (the smallest module holding the output head and every other name of its
    tensors, e.g. BERT's `cls.predictions`, whose bias is the head's; None without a head
    or when it cannot be isolated). `tables`: per region, the weights (by their name in
    the region) that the model declares as vocabulary tables. `note`: why a part stays
    whole."""

    embeddings: tuple[str, ...]
    head: str | None
    tables: dict[str, frozenset[str]]
    note: str = ""

    @property
    def regions(self) -> tuple[str, ...]:
        return (*self.embeddings, *([self.head] if self.head is not None else []))


def _whole(note: str) -> VocabRegions:
    return VocabRegions((), None, {}, note)


def _paths(model: nn.Module, target: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules(remove_duplicate=False) if m is target]


def _inside(name: str, path: str) -> bool:
    return name.startswith(path + ".")


def vocab_regions(model: nn.Module, layers: list[str]) -> VocabRegions:
    """The vocabulary regions of `model` (a transformers model, or a module wrapping one),
    given the paths of its repeated layers: a region holds none of them, and every name
    of a tensor it splits lies in a vocabulary region."""
    found = transformers_model(model)
    if found is None:
        return _whole("not a transformers model")
    inner_path, module = found
    inner: Any = module  # a transformers PreTrainedModel (_is_pretrained)
    prefix = inner_path + "." if inner_path else ""
    try:  # a model without a token vocabulary (audio, vision) raises NotImplementedError
        emb = inner.get_input_embeddings()
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    except (NotImplementedError, AttributeError):
        return _whole("the model declares no input embedding")
    if not isinstance(emb, nn.Embedding):
        return _whole("the input embedding is not an nn.Embedding")
    holders = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is emb.weight]
    embeddings = []
    for m in holders:  # an encoder-decoder's shared table: one module per user, one weight
        paths = _paths(model, m)
        if len(paths) != 1:
            return _whole(f"an embedding is reached by {len(paths)} paths ({', '.join(paths)})")
        embeddings.append(paths[0])
    names = names_by_tensor(model, buffers=False)
    tables = {e: frozenset({"layer.weight"}) for e in embeddings}

    def in_embedding(n: str) -> bool:
        return any(_inside(n, e) for e in embeddings)

    head_path = None
    note = ""
    if isinstance(head, nn.Linear) and head.out_features == emb.num_embeddings:
        paths = _paths(model, head)
        if len(paths) == 1:
            outside = [
                n for t in head.parameters() for n in names[id(t)]
                if not _inside(n, paths[0]) and not in_embedding(n)
            ]  # fmt: skip
            region = common_prefix([paths[0], *[n.rpartition(".")[0] for n in outside]])
            if (
                region
                and region.startswith(prefix)
                and not any(_inside(p, region) or p == region for p in layers)
            ):
                head_path = region
                rel = paths[0].removeprefix(region).lstrip(".")
                tables[region] = frozenset({f"layer.{rel}.weight" if rel else "layer.weight"})
            else:
                note = "the output head shares tensors with modules around the layers"
        else:
            note = f"the output head is reached by {len(paths)} paths"
    elif head is not None:
        note = f"the output head ({type(head).__name__}) is not a linear over the vocabulary"
    # a tensor of a region that is also named outside every region stays whole: the
    # regions' split copies would leave the other name holding the serial one
    regions = [*embeddings, *([head_path] if head_path else [])]
    for path in regions:
        for t in model.get_submodule(path).parameters():
            stray = [n for n in names[id(t)] if not any(_inside(n, r) for r in regions)]
            if stray:
                return _whole(f"{stray[0]} is a vocabulary tensor too")
    return VocabRegions(tuple(embeddings), head_path, tables, note)


_State = dict[str, torch.Tensor | None]  # a state_dict, gathered (`full_tensors`)


class SaveGathered:
    """The parallel model's `save_pretrained`: transformers' own, given the serial
    state_dict (`full(model)`: the shards gathered, a collective under `parallelize`) and
    written by global rank 0 unless `is_main_process` says otherwise, so that
    `from_pretrained` reads the folder back as the serial model. An object, not a closure,
    so that a deepcopy of the model saves the copy."""

    def __init__(self, model: nn.Module, full: Callable[[nn.Module], _State], rank: int) -> None:
        self.model, self.full, self.rank = model, full, rank
        kind: Any = type(model)  # a transformers PreTrainedModel's class (gathering_save)
        self.__doc__ = kind.save_pretrained.__doc__

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = self.full(self.model)
        if "is_main_process" not in kwargs:
            main = dist.get_rank() == 0 if dist.is_available() and dist.is_initialized() else True
            kwargs["is_main_process"] = main and self.rank == 0
        kind: Any = type(self.model)  # a transformers PreTrainedModel's class
        return kind.save_pretrained(self.model, save_directory, *args, **kwargs)


def gathering_save(model: nn.Module, full: Callable[[nn.Module], _State], rank: int) -> None:
    """Give `model` (the parallel model's transformers model) a `save_pretrained` that
    writes the serial checkpoint; nothing for a model that has none."""
    if _is_pretrained(model):
        # a plain attribute of the module, in front of its class's save_pretrained
        model.save_pretrained = SaveGathered(model, full, rank)  # type: ignore[assignment]
