"""How a model calls one of its regions, taken apart for tracing: the call's tensors by
name and the rest fixed (`take_apart`), a module whose forward takes those tensors and
calls the region (`call_module`), the cache the layer sees meanwhile (`Recorder`), and the
sizes that may vary between calls (`dynamic_sizes`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

import torch
import torch.nn as nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..common.errors import AutoTPError
from ..integrations.hf import encoder_decoder_cache, is_cache, is_encoder_decoder

__all__ = ["RegionCall", "PAST", "Recorder", "cache_index", "call_module", "dynamic_sizes",
           "modes", "take_apart"]  # fmt: skip

PAST = ("past_key", "past_value")

# where a call's cache sat: ("arg", position) or ("kwarg", name), then whether it is an
# encoder-decoder's pair of caches
CacheAt: TypeAlias = tuple[Literal["arg"], int, bool] | tuple[Literal["kwarg"], str, bool]
# per leaf of a call: an input name, or ("const", value)
Slot: TypeAlias = str | tuple[str, Any]
# what fixes a call's graph: the pytree spec (as text), each leaf's (dtype, dim) or
# constant (repr), where the cache sat, whether a past is given, the modules' modes. Not
# the device: every pattern is traced on the CPU (state.TRACED_ON) and its graph built on
# the rank's device, so a model planned on meta plans no call again on the CPU or a GPU
CallKey: TypeAlias = tuple[
    str, tuple[tuple[torch.dtype, int] | str, ...], CacheAt | None, bool, tuple[bool, ...]
]


def modes(region: nn.Module) -> tuple[bool, ...]:
    """Every module's train/eval flag: what a traced graph froze (Python reading
    self.training, dropout on or off)."""
    return tuple(m.training for m in region.modules())


@dataclass(frozen=True)
class RegionCall:
    """One call of a region, taken apart: its tensors by input name, the rest fixed."""

    spec: TreeSpec  # pytree spec of (args, kwargs), the cache replaced by None
    slots: tuple[Slot, ...]  # per leaf: an input name, or ("const", value)
    cache_at: CacheAt | None  # where the cache sat: ("arg", i) or ("kwarg", name)
    tensors: dict[str, torch.Tensor]
    key: CallKey

    def rebuild(
        self, tensors: dict[str, Any], cache: object
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        leaves = [tensors[s] if isinstance(s, str) else s[1] for s in self.slots]
        args, kwargs = tree_unflatten(leaves, self.spec)
        if self.cache_at is not None:
            if self.cache_at[0] == "arg":
                at = self.cache_at[1]
                args = (*args[:at], cache, *args[at + 1 :])
            else:
                kwargs = {**kwargs, self.cache_at[1]: cache}
        return args, kwargs


def take_apart(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    past: tuple[torch.Tensor, torch.Tensor] | None,
    training: tuple[bool, ...],
) -> RegionCall:
    cache_at: CacheAt | None = None
    items, named = list(args), dict(kwargs)
    for i, a in enumerate(items):
        if is_cache(a):
            cache_at, items[i] = ("arg", i, is_encoder_decoder(a)), None
    for k, v in named.items():
        if is_cache(v):
            cache_at, named[k] = ("kwarg", k, is_encoder_decoder(v)), None
    leaves, spec = tree_flatten((tuple(items), named))
    slots: list[Slot] = []
    tensors: dict[str, torch.Tensor] = {}
    consts: list[tuple[torch.dtype, int] | str] = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            name = f"in{i}"
            slots.append(name)
            tensors[name] = leaf
            consts.append((leaf.dtype, leaf.dim()))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype)):
            slots.append(("const", leaf))
            consts.append(repr(leaf))
        else:  # an object the graph would bake in, and whose changes it would miss
            raise AutoTPError(
                f"a parallel region was called with a {type(leaf).__name__}, which autotp "
                "cannot carry into its graph (it carries tensors, numbers, strings and "
                "transformers' DynamicCache)",
                hint="call the model without it (e.g. "
                "use_cache=False for an encoder-decoder cache)",
            )
    if past is not None:
        tensors.update(zip(PAST, past, strict=True))
    key: CallKey = (str(spec), tuple(consts), cache_at, past is not None, training)
    return RegionCall(spec, tuple(slots), cache_at, tensors, key)


class Recorder:
    """The cache a layer sees while traced: it returns the past and new keys and values
    joined along the sequence (what DynamicCache.update returns) and keeps the new ones."""

    def __init__(self, key: torch.Tensor | None, value: torch.Tensor | None) -> None:
        self.past = (key, value)
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None
        self.index: Any = None

    def update(
        self, key: torch.Tensor, value: torch.Tensor, index: Any = None, *a: Any, **k: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.new is not None:
            raise AutoTPError("the layer updates its cache twice in one call: not supported")
        self.new, self.index = (key, value), index
        past_key, past_value = self.past
        if past_key is None:
            return key, value
        assert past_value is not None  # the past keys and values come together (take_apart)
        return (torch.cat([past_key, key], dim=-2), torch.cat([past_value, value], dim=-2))

    def get_seq_length(self, *a: Any, **k: Any) -> int:
        """The length of the past (T5's relative positions start there)."""
        return 0 if self.past[0] is None else self.past[0].shape[-2]

    def __getattr__(self, name: str) -> Any:
        raise AutoTPError(
            f"the layer calls its cache's `{name}`, which autotp does not model (it models "
            "`update` and `get_seq_length`, as DynamicCache does)",
            hint="call the model with use_cache=False",
        )


def call_module(region: nn.Module, call: RegionCall) -> nn.Module:
    """A module whose forward takes the call's tensors by name and calls the region."""
    holder = nn.Module()
    holder.layer = region
    # nn.Module.__setattr__ is typed for tensors and modules only; any value is kept
    holder.autotp_hooks_outside = ("layer",)  # type: ignore[assignment]
    names = list(call.tensors)

    def forward(**tensors: torch.Tensor) -> Any:
        rec = given = None
        if call.cache_at is not None:
            rec = given = Recorder(tensors.pop(PAST[0], None), tensors.pop(PAST[1], None))
            if call.cache_at[2]:
                given = encoder_decoder_cache(rec, _CrossRecorder())
        args, kwargs = call.rebuild(tensors, given)
        # its forward, not its hooks: a hook on the serial region belongs to the serial
        # model's Python; the parallel model calls the RegionTP's own
        out = cast(nn.Module, holder.layer).forward(*args, **kwargs)
        if rec is None:
            return out
        if rec.new is None:
            raise AutoTPError("the layer was given a cache but did not update it")
        holder.index = rec.index
        return out, rec.new[0], rec.new[1]

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
    )
    holder.forward = forward
    return holder


class _CrossRecorder:
    """An encoder-decoder cache's cross-attention half while a layer is traced: never
    updated before, so the layer computes the encoder's keys and values from its states
    on every call (a parallel layer keeps no cross-attention cache: what it would hold is
    recomputed, each rank its own heads)."""

    def update(
        self, key: torch.Tensor, value: torch.Tensor, *a: Any, **k: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return key, value

    def __getattr__(self, name: str) -> Any:
        raise AutoTPError(
            f"the layer reads its cross-attention cache's `{name}`, which autotp does not model",
            hint="call the model with use_cache=False",
        )


def dynamic_sizes(call: RegionCall, batch: int, seqs: set[int]) -> dict[str, Any]:
    """Dynamic dimensions: the batch (a leading size equal to it) and every size equal to a
    sequence length (new tokens, past, or both); export keeps static what the code fixes."""
    auto = torch.export.Dim.AUTO
    out: dict[str, Any] = {}
    for name, t in call.tensors.items():
        d = {
            i: auto
            for i, s in enumerate(t.shape)
            if s > 1 and ((i == 0 and s == batch) or s in seqs)  # export fixes 0 and 1
        }
        out[name] = d or None
    return out


def cache_index(layer: nn.Module) -> int | None:
    """The layer's place in the model's cache: the first int its modules hold under a
    layer index's usual names, or None."""
    for m in layer.modules():
        for name in ("layer_idx", "layer_id", "layer_index"):
            value = m.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None
