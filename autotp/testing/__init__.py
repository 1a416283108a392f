"""Property-test your own model the way autotp's tests do.

    from autotp.testing import assert_equivalent
    report = assert_equivalent(model, example_inputs, tp=4)   # float64, via simulate

`assert_equivalent` compares the parallel module with the serial model on outputs, the
loss, every parameter gradient, the gradients of floating inputs, and every weight after
one SGD step (momentum, weight decay), and
raises an AssertionError listing the largest differences when any exceeds the tolerance.
Pass `parallel=` to check a module built another way, e.g. `autotp.parallelize` on real
processes (call it on every rank; `run_on_gloo` starts them).

`tp_cases()` is a hypothesis strategy over the reference models' small configurations;
`run_on_gloo` forks local gloo processes; `fuzz/` is the structural fuzzer (random models
from a grammar of structures and spellings, and the verdict on each).

Takes a model and inputs; gives a verdict against the serial model (the top layer of the
library: it imports the public API only).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..parallel import full_grads, full_state_dict, simulate

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ["Report", "assert_equivalent", "difference", "TPCase", "tp_cases", "run_on_gloo"]


@dataclass
class Report:
    """Largest absolute differences between parallel and serial, by what was compared."""

    diffs: dict[str, float] = field(default_factory=dict)  # "grad:name" -> max |a - b|
    scales: dict[str, float] = field(default_factory=dict)  # "grad:name" -> max |serial|

    def largest(self, prefix: str = "") -> float:
        vals = [v for k, v in self.diffs.items() if k.startswith(prefix)]
        return max(vals, default=0.0)

    def worst(self, n: int = 10) -> list[tuple[str, float]]:
        return sorted(self.diffs.items(), key=lambda kv: -kv[1])[:n]

    def __str__(self) -> str:
        parts = [f"{p}: {self.largest(p + ':'):.3g}" for p in ("output", "loss", "grad", "step")]
        return "largest differences: " + ", ".join(parts)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    def one(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tree_map(one, x)


def _leaf_copy(inputs: Any) -> Any:
    """Fresh leaves: floating tensors require grad, others are plain copies."""

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().clone().requires_grad_(t.is_floating_point())

    return tree_map(one, inputs)


def _call(module: nn.Module, inputs: Any) -> Any:
    return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def _scalar(
    outputs: Any, weights: list[torch.Tensor] | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A loss touching every floating output: scalars as they are, others weighted by fixed
    random tensors (the same for both models), so every output's gradient is checked."""
    leaves = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]
    leaves = [t for t in leaves if t.is_floating_point()]
    if weights is None:
        g = torch.Generator().manual_seed(1234)
        weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in leaves]
    total = sum((t * w.to(t.device)).sum() for t, w in zip(leaves, weights, strict=True))
    return cast(torch.Tensor, total), weights  # the int 0 only where no output is floating


def _record(report: Report, key: str, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    report.diffs[key] = difference(a, b)
    report.scales[key] = a.detach().abs().max().item() if a is not None and a.numel() else 0.0


def difference(a: Any, b: Any, *, relative: bool = False) -> float:
    """How far a parallel value `b` is from the serial value `a`: the largest difference
    of two tensors (relative to the serial magnitude, absolute below 1, with `relative`);
    inf where they cannot be equal (one missing, other shapes or dtypes, NaN or inf in
    other places, unequal integers or non-tensors); 0 for equal non-tensors (None
    included). The one comparator of assert_equivalent and the fuzzer's oracle."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return float("inf")
        return 0.0 if a == b else float("inf")
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, b = a.detach(), b.detach().to(a.device)
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    if not bool((torch.isnan(a) == torch.isnan(b)).all()):
        return float("inf")
    a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    if not torch.equal(inf_a, inf_b) or not torch.equal(a[inf_a], b[inf_b]):
        return float("inf")
    a, b = a.masked_fill(inf_a, 0.0), b.masked_fill(inf_b, 0.0)
    d = (a.double() - b.double()).abs().max().item()
    return d / max(1.0, a.abs().max().item()) if relative else d


def assert_equivalent(
    model: nn.Module,
    example_inputs: Any = None,
    tp: int = 2,
    *,
    dtype: torch.dtype = torch.float64,
    atol: float = 1e-10,
    rtol: float = 0.0,
    parallel: Callable[[nn.Module, int, Any], nn.Module] | None = None,
    lr: float = 1e-2,
) -> Report:
    """Check that the tp-parallel version of `model` equals it: outputs, loss, every
    gradient, and the weights after one SGD step. `model` is not modified (copies are
    cast to `dtype`). Returns the Report; raises AssertionError when a difference exceeds
    `atol + rtol * max|serial value|` (rtol=0: float64 is exact to rounding; use about
    1e-5 for float32)."""
    if example_inputs is None:
        example_inputs = model.example_inputs()  # type: ignore[operator]
    inputs = _cast(example_inputs, dtype)
    serial = copy.deepcopy(model).to(dtype)
    build = parallel or (lambda m, t, x: simulate(m, t, x))
    par = build(copy.deepcopy(serial), tp, inputs)
    report = Report()

    # each model its own leaf copy of every floating input, so input gradients compare too
    inputs_s, inputs_p = _leaf_copy(inputs), _leaf_copy(inputs)
    out_s, out_p = _call(serial, inputs_s), _call(par, inputs_p)
    leaves_s, leaves_p = tree_flatten(out_s)[0], tree_flatten(out_p)[0]
    for i, (a, b) in enumerate(zip(leaves_s, leaves_p, strict=True)):
        if isinstance(a, torch.Tensor):
            kind = "loss" if a.dim() == 0 else "output"
            _record(report, f"{kind}:{i}", a, b)
    loss_s, weights = _scalar(out_s, None)
    loss_p, _ = _scalar(out_p, weights)
    loss_s.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    loss_p.backward()  # type: ignore[no-untyped-call]

    grads_p = full_grads(par)
    for name, p in serial.named_parameters():
        _record(report, f"grad:{name}", p.grad, grads_p[name])
    leaves_s, leaves_p = tree_flatten(inputs_s)[0], tree_flatten(inputs_p)[0]
    for i, (a, b) in enumerate(zip(leaves_s, leaves_p, strict=True)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            _record(report, f"grad:input {i}", a.grad, b.grad)

    # SGD, not Adam: Adam's first step is lr * sign(grad), which turns a rounding-level
    # difference in a gradient that is zero in exact arithmetic (e.g. the key bias) into lr.
    for m in (serial, par):
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=0.1)
        opt.step()
    state_p = full_state_dict(par)
    for name, t in serial.state_dict().items():
        _record(report, f"step:{name}", t, state_p.get(name))

    bad = [
        (k, v)
        for k, v in report.worst(len(report.diffs))
        if not v <= atol + rtol * report.scales[k]
    ]
    if bad:
        lines = "\n".join(f"  {k}: {v:.3g}" for k, v in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise AssertionError(
            f"tp={tp} differs from serial beyond atol={atol:g}, rtol={rtol:g} ({dtype}):\n"
            f"{lines}{more}\n{report}"
        )
    return report


@dataclass(frozen=True)
class TPCase:
    """One configuration to test: a model name and overrides, its inputs' shape, and tp."""

    name: str
    overrides: dict[str, Any]
    tp: int
    batch: int
    seq: int
    mask: bool = True

    def build(self, seed: int = 0) -> nn.Module:
        from autotp.models import build

        torch.manual_seed(seed)
        model: nn.Module = build(self.name, **self.overrides)
        return model

    def inputs(self, model: nn.Module) -> dict[str, Any]:
        example_inputs = cast("Callable[..., dict[str, Any]]", model.example_inputs)
        if self.name.startswith("bert"):
            return example_inputs(batch=self.batch, seq=self.seq, mask=self.mask)
        return example_inputs(batch=self.batch, seq=self.seq)


def tp_cases(
    tps: tuple[int, ...] = (1, 2, 4, 8), families: tuple[str, ...] = ("gpt2", "bert")
) -> SearchStrategy[TPCase]:
    """A hypothesis strategy of TPCase over small GPT-2 and BERT configurations: layers,
    heads (a multiple of tp), head width, MLP width, vocabulary, batch, sequence length,
    pre-/post-LN, explicit or SDPA attention, with and without an attention mask."""
    from hypothesis import strategies as st

    @st.composite
    def case(draw: st.DrawFn) -> TPCase:
        tp = draw(st.sampled_from(tps))
        family = draw(st.sampled_from(families))
        heads = tp * draw(st.sampled_from([1, 2]))
        head_dim = draw(st.sampled_from([2, 4]))
        hidden = heads * head_dim
        layers = draw(st.integers(1, 2))
        vocab = draw(st.sampled_from([13, 32, 50]))
        batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 8))
        if family == "gpt2":
            name = draw(st.sampled_from(["gpt2-tiny", "gpt2-tiny-flash"]))
            over = dict(n_layer=layers, n_head=heads, n_embd=hidden, vocab_size=vocab)
            return TPCase(name, over, tp, batch, seq)
        name = draw(st.sampled_from(["bert-tiny", "bert-tiny-preln"]))
        ffn = hidden * draw(st.sampled_from([1, 2, 4]))
        over = dict(
            num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden,
            intermediate_size=ffn, vocab_size=vocab,
        )  # fmt: skip
        return TPCase(name, over, tp, batch, seq, mask=draw(st.booleans()))

    return case()


def _gloo_worker(
    fn: Callable[..., Any], rank: int, world: int, port: int, q: Any, args: tuple[Any, ...],
    torchrun: bool,
) -> None:  # fmt: skip
    import os
    import pickle
    import traceback

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        if torchrun:  # the rank joins the group itself, from torchrun's environment
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                              LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_WORLD_SIZE=str(world))  # fmt: skip
        else:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
            )
        result = pickle.dumps(fn(rank, world, *args))  # plain bytes: tensors copied, not shared
        if dist.is_initialized():
            dist.barrier()  # every rank done before any tears the group down
        q.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_gloo(
    fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120, torchrun: bool = False
) -> list[Any]:  # fmt: skip
    """Run `fn(rank, world, *args)` on `world` forked processes joined in a gloo process
    group on 127.0.0.1; return each rank's result, or raise with the failing rank's
    traceback. `fn` and its results must be picklable or defined before the fork.
    `torchrun=True`: no group is made; each rank gets torchrun's environment (MASTER_ADDR,
    MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE) and `fn` joins one itself, as a script
    under `torchrun` does (`init_process_group("gloo")`)."""
    import multiprocessing as mp
    import pickle
    import queue
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_gloo_worker, args=(fn, r, world, port, q, args, torchrun), daemon=True
        )  # fmt: skip
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, value = q.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            results[rank] = pickle.loads(value)
    except queue.Empty:
        raise AssertionError(f"gloo ranks timed out after {timeout}s") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
