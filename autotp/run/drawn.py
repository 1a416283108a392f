"""A model built from a seed without its large tensors, whose every tensor can still be
drawn, one at a time, exactly as the serial build draws it.

    drawn = Drawn.build(lambda: Model(config), seed=0)   # large tensors on the meta device
    drawn.model                                          # the model, for planning
    drawn.read(name, spec, rank, tp, dtype, shape)       # rank's shard of its serial value

A transformers model built from its config draws its weights from torch's global
generator, in construction order (each layer's default initialisation, then the model's
own `_init_weights`): a weight's value depends on everything drawn before it, so it cannot
be drawn on its own as autotp's named models draw theirs. While the model is built, every
tensor of at least `LARGE` elements is made on the meta device instead, and what is written
into it is recorded: the op, its arguments, and the generator's state before a random op.
A random op is also run on a scratch tensor of the same layout, so the generator moves on
as in the serial build and what is drawn after it is the serial value. Small tensors
(norms, biases, rotary tables) are built for real.

Reading a tensor replays its writes on a scratch tensor of its size, each random one from
its recorded generator state: the serial value, whole, one tensor at a time; a rank keeps
its shard. A tensor whose value the record cannot give (written from another large
tensor, or read to compute a small one) makes `build` refuse, and the caller builds the
model whole instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ..common.errors import AutoTPError
from ..sharding import Shard
from ..sharding.placement import cut

__all__ = ["Drawn", "LARGE", "draw"]

LARGE = 1 << 16  # elements: a tensor this large is drawn when read, not kept
_META = torch.device("meta")
# (shape, stride, storage offset) of a tensor in its storage
_Layout: TypeAlias = tuple[tuple[int, ...], tuple[int, ...], int | torch.SymInt]


class _Scratch:
    """One buffer per dtype that every replay writes into, grown to the largest storage:
    no allocation per tensor (the C allocator would keep the freed memory)."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        have = self._buffers.get(dtype)
        if have is None or have.numel() < numel:
            self._buffers.pop(dtype, None)
            have = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return have[:numel]


def _key(t: torch.Tensor) -> int:
    key: int = t.untyped_storage()._cdata
    return key


def _layout(t: torch.Tensor) -> _Layout:
    return tuple(t.shape), tuple(t.stride()), t.storage_offset()


@dataclass(frozen=True)
class _Slot:
    """Where a write's drawn tensor was: its layout in the storage (a pytree leaf)."""

    layout: _Layout


@dataclass
class _Write:
    """One op that wrote into a drawn tensor's storage: `args` with each drawn tensor as
    a _Slot; `rng`: the generator's state before a random op."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: torch.Tensor | None


@dataclass
class _Storage:
    numel: int
    dtype: torch.dtype
    writes: list[_Write] = field(default_factory=list)


class _Recording(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch: unannotated
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.storages: dict[int, _Storage] = {}
        self.refusal: str | None = None
        self.scratch = _Scratch()

    def _ours(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.is_meta and _key(t) in self.storages

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:  # fmt: skip
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if not tensors:
            return self._factory(func, args, kwargs)
        if not any(t.is_meta for t in tensors):
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        written = _written(func, args, kwargs)
        reads = [t for t in tensors if t.is_meta and not any(t is w for w in written)]
        if len(written) == 1 and self._ours(written[0]):
            if reads:  # written from another meta value, whose value is not kept
                self._refuse(f"{func} writes one large tensor from another")
            else:
                self._record(func, args, kwargs, written[0])
        elif written or not _is_view(func):
            self._refuse(f"{func} reads or writes a large tensor's value")
        return out

    def _factory(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "device" not in kwargs and not any(
            s.name == "device" for s in func._schema.arguments
        ):  # fmt: skip
            return func(*args, **kwargs)
        shaped = func(*args, **{**kwargs, "device": _META})
        large = isinstance(shaped, torch.Tensor) and shaped.numel() >= LARGE
        if not large or (kwargs.get("device") not in (None, torch.device("cpu"), "cpu")):
            return func(*args, **kwargs)
        self.storages[_key(shaped)] = _Storage(shaped.untyped_storage().nbytes()
                                               // shaped.element_size(), shaped.dtype)  # fmt: skip
        if func._schema.name not in ("aten::empty", "aten::empty_strided"):
            self._record(func, args, kwargs, shaped, created=True)
        return shaped

    def _record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                target: torch.Tensor, created: bool = False) -> None:  # fmt: skip
        store = self.storages[_key(target)]
        random = torch.Tag.nondeterministic_seeded in func.tags
        rng = torch.get_rng_state() if random else None
        if any(isinstance(v, torch.Generator) for v in kwargs.values()):
            self._refuse(f"{func} draws from a generator of its own")
            return
        shown = tree_map(lambda a: _Slot(_layout(a)) if self._ours(a) else a, (args, kwargs))
        store.writes.append(_Write(func, shown[0], dict(shown[1]), rng))
        if created:
            store.writes[-1].kwargs["_created"] = _layout(target)
        if random:  # the generator moves on as in the serial build (this mode is off here)
            _replay(store.writes[-1], self.scratch.get(store.numel, store.dtype))

    def _refuse(self, why: str) -> None:
        self.refusal = self.refusal or why


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments `func` writes into (in-place and out= arguments)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
            if value is not None:
                out.append(value)
    return out


def _is_view(func: Any) -> bool:
    """`func` returns views of its input (aliases it does not write)."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write
                              for r in rets)  # fmt: skip


def _replay(write: _Write, base: torch.Tensor) -> None:
    """Apply `write` to `base` (the storage's whole scratch), from its generator state."""

    def real(a: Any) -> Any:
        return base.as_strided(*a.layout) if isinstance(a, _Slot) else a

    kwargs = dict(write.kwargs)
    created = kwargs.pop("_created", None)
    args, kwargs = tree_map(real, (write.args, kwargs))
    if write.rng is not None:
        torch.set_rng_state(write.rng)
    if created is not None:
        shape, stride, offset = created
        value = write.func(*args, **kwargs)
        base.as_strided(shape, stride, offset).copy_(value)
    else:
        write.func(*args, **kwargs)


class Drawn:
    """A model built with its large tensors on meta, and their serial values on demand:
    a source `autotp.parallelize(model, plan, weights=drawn)` reads each rank's shards
    from, like a file."""

    def __init__(self, model: nn.Module, storages: dict[int, _Storage]) -> None:
        self.model = model
        self.path = Path("<drawn from the seed>")
        self._storages = storages
        self._scratch = _Scratch()
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in [*model.named_parameters(remove_duplicate=False),
                        *model.named_buffers(remove_duplicate=False)]:  # fmt: skip
            if t.is_meta:
                self._tensors[name] = t

    @classmethod
    def build(cls, make: Callable[[], nn.Module], seed: int) -> Drawn:
        """`make()` after torch.manual_seed(seed), its large tensors recorded; refuses
        (AutoTPError) where a tensor's value cannot be drawn on its own."""
        torch.manual_seed(seed)
        rec = _Recording()
        with rec:
            model = make()
        if rec.refusal is None:
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                store = rec.storages.get(_key(t)) if t.is_meta else None
                if t.is_meta and (store is None or not store.writes):
                    rec.refusal = f"{name} is never written while the model is built"
        if rec.refusal is not None:
            raise AutoTPError(f"cannot draw {type(model).__name__}'s tensors one at a time: "
                              f"{rec.refusal}")  # fmt: skip
        return cls(model, rec.storages)

    def on_meta(self) -> nn.Module:
        """A copy of the model wholly on the meta device (to plan it), ties kept."""
        memo: dict[int, Any] = {}
        for t in [*self.model.parameters(), *self.model.buffers()]:
            empty = torch.empty_like(t, device=_META)
            keep = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
            memo.setdefault(id(t), keep)
        return copy.deepcopy(self.model, memo)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def find(self, names: list[str]) -> str | None:
        return next((n for n in names if n in self._tensors), None)

    def missing(self, name: str) -> AutoTPError:
        return AutoTPError(f"{name} is on the meta device and was not drawn")

    def whole(self, name: str) -> torch.Tensor:
        """The serial value of `name`, drawn anew (the global generator is left as it
        was): a view of a scratch buffer, valid until the next read."""
        t = self._tensors[name]
        store = self._storages[_key(t)]
        state = torch.get_rng_state()
        try:
            base = self._scratch.get(store.numel, store.dtype)
            for write in store.writes:
                _replay(write, base)
        finally:
            torch.set_rng_state(state)
        return base.as_strided(t.shape, t.stride(), t.storage_offset())

    def read(
        self, name: str, spec: Shard | None, rank: int, tp: int, dtype: torch.dtype,
        shape: tuple[int, ...],
    ) -> torch.Tensor:  # fmt: skip
        """Rank `rank`'s shard of `name` (whole when `spec` is None), in `dtype`."""
        return cut(self.whole(name), spec, rank, tp).to(dtype).clone()


def draw(spec: str, seed: int) -> Drawn | None:
    """The model `spec` names (autotp.run.resolve), an hf: or factory model, built from
    `seed` with its large tensors drawn when read; None for the others (autotp's named
    models draw each parameter on its own; minilm's weights are read from its package)
    and where they cannot be drawn (it is then built whole)."""
    from autotp.models import CONFIGS

    from .resolve import build

    if spec in CONFIGS or spec == "minilm":
        return None
    try:
        return Drawn.build(lambda: build(spec), seed)
    except AutoTPError:
        return None
