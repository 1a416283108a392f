"""What a parallel region is as a module, apart from how it runs: the state its graphs
depend on, read on every call (`RegionState`), the meta twin its patterns are traced from
(`twin`), and serial state_dicts cut into its shards on load (`cut_serial_state`).

A parallel region's submodules are what runs: with `parallelize` the region holds its
rank's shards under the serial region's names (so `model.layers[0].mlp.up_proj.weight` is this
rank's shard of it), with `simulate` each rank's shell sits in `region.ranks`. A user may
edit them as in any module: weights (in place, by assignment, `load_state_dict(...,
assign=True)`, `torch.func.functional_call`), `requires_grad_`, plain attributes (dropout
`p`), the config the layers read (`set_attn_implementation`), the dtype. The graphs follow:
a call whose tensors are other objects rebuilds them over the new tensors, and a call whose
attributes, classes or dtypes differ is traced again from a twin of the region as it now is.
What a graph cannot follow (a hook inside the region, a tensor of another shape) is refused.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn

from ..build.materialise import _fresh_module, rank_shard
from ..common.errors import AutoTPError
from ..common.hooks import has_hooks, hooks_of
from ..integrations.hf import collects as _collects
from ..integrations.hf import is_config
from ..sharding import Shard

__all__ = ["RegionState", "twin", "tensor_shapes", "cut_serial_state", "SerialAttributeError"]

_PLAIN = (int, float, str, bool, type(None))
# flags that switch what calls the region, not what the region computes
_NOT_TRACED = frozenset({"training", "gradient_checkpointing", "layer_idx"})


class SerialAttributeError(AutoTPError, AttributeError):
    """A simulated region's submodule or tensor reached by attribute path: each rank holds
    its own (an AttributeError too, so `hasattr` stays a question)."""

    title = "autotp: reach a simulated rank's region"


def _config_items(cfg: object) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in vars(cfg).items() if isinstance(v, _PLAIN))


class RegionState:
    """One read of a parallel region's modules: `key`, what its traced graphs depend on
    (classes, plain attributes, the config they read, tensor dtypes: a new one is traced
    again); `binding`, the tensors the graphs run over (new ones: the graphs are rebuilt).
    Hooks inside the region, which its one graph cannot run, are refused here."""

    def __init__(self, shells: list[nn.Module], path: str, outer: nn.Module) -> None:
        keys, binding = [], []
        for r, shell in enumerate(shells):
            key: list[Any] = []
            for m in shell.modules():
                if m is not outer and has_hooks(m):
                    name = next(n for n, x in shell.named_modules() if x is m)
                    _refuse_hook(m, f"{path}.{name}" if name else path, r, len(shells))
                d = m.__dict__
                key.append(d.get("_autotp_kind", type(m)))
                for k in _public(m, d):
                    v = d[k]
                    if isinstance(v, _PLAIN):
                        key.append((k, v))
                    elif isinstance(v, tuple):
                        key.append((k, repr(v)))
                    elif is_config(v):
                        key.append((k, _config_items(v)))
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is not None:
                        key.append(t.dtype)
                        binding.append((id(t), t.requires_grad))
            keys.append(tuple(key))
        if any(k != keys[0] for k in keys):
            raise AutoTPError(
                f"the simulated ranks' copies of {path} differ (a class, an attribute or a "
                "dtype set on some ranks only)",
                hint="change every rank's copy alike, e.g. through model.modules()",
            )
        self.key = keys[0]
        self.binding = tuple(binding)


_PUBLIC: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _public(m: nn.Module, d: dict[str, Any]) -> tuple[str, ...]:
    """The names of `m`'s own attributes a traced graph may depend on, kept per module
    while its __dict__ keeps its size (read on every call: no string tests then)."""
    cached = _PUBLIC.get(m)
    if cached is None or cached[0] != len(d):
        names = tuple(k for k in d if not k.startswith("_") and k not in _NOT_TRACED)
        cached = _PUBLIC[m] = (len(d), names)
    return cached[1]


def _refuse_hook(m: nn.Module, where: str, rank: int, ranks: int) -> None:
    kinds = [what for _, what, _ in hooks_of(m, _collects)]
    if kinds:
        shown = where if ranks == 1 else f"{where} (rank {rank}'s copy)"
        raise AutoTPError(
            f"{shown} has a {kinds[0]}, but a parallel region runs as one "
            "graph, so a hook inside it would never be called",
            hint="register the "
            "hook on the region itself (its inputs and outputs are the serial region's), or "
            "on a module outside the regions",
        )


def twin(shell: nn.Module, kind: type, shapes: dict[str, torch.Size], path: str) -> nn.Module:
    """The region as it now is (its classes, attributes, config, dtypes) with unfilled
    tensors of the serial region's shapes (`_unfilled`): what a call pattern is traced
    from. `shapes`: the serial shape of every tensor, by its name in the region."""
    names: dict[int, str] = {}
    for n, t in [*shell.named_parameters(remove_duplicate=False),
                 *shell.named_buffers(remove_duplicate=False)]:  # fmt: skip
        names.setdefault(id(t), n)

    def stand_in(t: torch.Tensor) -> torch.Tensor:
        name = names[id(t)]
        if name not in shapes:
            raise AutoTPError(
                f"{path}.{name} was added to the parallel region after autotp built it, so "
                "autotp holds no serial form of it to plan with",
                hint="make such "
                "changes (adapters, new layers) to the model before autotp.parallelize",
            )
        empty = _unfilled(shapes[name], t.dtype)
        return nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty

    made: dict[int, torch.Tensor] = {}
    root = _fresh_module(shell, lambda t: made.setdefault(id(t), stand_in(t)))
    if type(root) is not kind:  # the parallel region itself: traced as the serial class
        root.__class__ = kind
        for k in [k for k in root.__dict__ if k.startswith("_autotp")]:
            del root.__dict__[k]
    return root


TRACED_ON = torch.device("cpu")  # where a region's call patterns are traced (`_unfilled`)


def _unfilled(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor never written: its pages are never touched, so it costs no memory.
    Tracing (torch.export fakes every input and weight) reads no value of it, and a
    tensor the region makes from a Python number while traced (torch.tensor(finfo.min,
    device=x.device)) keeps its value, which a meta tensor would lose."""
    return torch.empty(shape, dtype=dtype, device=TRACED_ON)


def tensor_shapes(region: nn.Module) -> dict[str, torch.Size]:
    """The shape of every parameter and buffer of `region`, by its name in the region."""
    return {n: t.shape for n, t in [*region.named_parameters(remove_duplicate=False),
                                    *region.named_buffers(remove_duplicate=False)]}  # fmt: skip


def cut_serial_state(
    state: dict[str, Any], prefix: str, ranks: list[int], tp: int,
    splits: dict[str, Shard], shapes: dict[str, torch.Size], nested: bool,
) -> None:  # fmt: skip
    """Turn the serial tensors of a region in `state` (serial names and shapes) into the
    shards of `ranks`, in place, so that a user can load a serial state_dict into a
    parallel model. A tensor of another shape (a shard already) is left to load_state_dict.
    `nested`: the shells sit under `ranks.<i>.` (simulate)."""
    for name, shape in shapes.items():
        key = prefix + name
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            continue
        if nested:
            del state[key]
        for i, rank in enumerate(ranks):
            local = rank_shard(value, [key], splits.get(name), rank, tp)
            state[f"{prefix}ranks.{i}.{name}" if nested else key] = local
