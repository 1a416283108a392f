"""The fuzzer's oracle: run a ModelCase through autotp.simulate (`check_case`) or
autotp.parallelize on forked gloo ranks (`check_case_gloo`) and compare with the serial
model in float64; the result is a `Verdict`."""

from __future__ import annotations

import contextlib
import copy
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ...build.simulate import plain_containers
from ...common.errors import AutoTPError, first_line
from .. import difference
from .case import ModelCase


@dataclass
class Verdict:
    """What autotp did with a case: "equal" (within tolerance), "refused" (AutoTPError),
    "wrong" (a difference; `diffs` holds the largest) or "crash" (another exception)."""

    kind: str
    detail: str = ""
    diffs: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.kind in ("equal", "refused")

    def signature(self) -> str:
        """A short key for grouping failures with (probably) one cause."""
        if self.kind == "crash":
            lines = [s for s in self.detail.strip().splitlines() if s.strip()]
            first = lines[0] if lines else ""
            return f"crash: {first[:160]}"
        if self.kind == "wrong":
            kinds = sorted({k.split(":")[0] for k, v in self.diffs.items() if v > 0})
            if len(kinds) > 1 and "container_type" in kinds:  # alone it is a failure
                kinds.remove("container_type")
            return "wrong: " + ",".join(kinds)
        return self.kind

    def __str__(self) -> str:
        if self.kind == "wrong":
            worst = sorted(self.diffs.items(), key=lambda kv: -kv[1])[:8]
            return "wrong: " + ", ".join(f"{k}={v:.3g}" for k, v in worst)
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


def _clone(inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
        for k, v in inputs.items()
    }


def _diff(a: Any, b: Any) -> float:
    return difference(a, b, relative=True)


def _compare(
    case: ModelCase,
    serial: nn.Module,
    par: nn.Module,
    inputs: dict[str, Any],
    grads_of: Callable[[nn.Module], dict[str, torch.Tensor | None]],
    atol: float,
    state_of: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
) -> Verdict:
    """Run both, backward both, compare; `par` was built in case.mode. With `state_of`
    (the parallel model's serial state_dict), then train both as users do and compare
    (see `_train`)."""
    if case.call_mode != case.mode:
        serial.train(case.call_mode == "train")
        par.train(case.call_mode == "train")
    xs, xp = _clone(inputs), _clone(inputs)
    torch.manual_seed(4321)  # both draw the same random numbers, as seeded ranks do
    out_s = serial(**xs)
    with contextlib.ExitStack() as tools:  # the parallel forward and backward, under them
        if "tool:comm_debug_mode" in case.features:
            from torch.distributed.tensor.debug import CommDebugMode

            tools.enter_context(CommDebugMode())  # type: ignore[no-untyped-call]  # torch
        verdict = _run_parallel(par, xp, serial, xs, out_s, case, grads_of, atol)
    if verdict.kind != "equal" or state_of is None:
        return verdict
    # outside the tools: CommDebugMode's module tracker fails a serial model's second
    # forward when a block runs under no_grad (PyTorch's, not autotp's)
    return _train(par, serial, inputs, state_of, verdict)


def _run_parallel(
    par: nn.Module,
    xp: dict[str, Any],
    serial: nn.Module,
    xs: dict[str, Any],
    out_s: Any,
    case: ModelCase,
    grads_of: Callable[[nn.Module], dict[str, torch.Tensor | None]],
    atol: float,
) -> Verdict:
    try:
        torch.manual_seed(4321)
        out_p = par(**xp)
    except AutoTPError as e:
        return Verdict("refused", f"at run time: {first_line(e)}")
    except Exception as e:  # noqa: BLE001 - every other exception is the verdict
        return Verdict("crash", _exc_text(e))
    diffs: dict[str, float] = {}
    # fx's immutable_dict / immutable_list returned for dict / list: a difference a user
    # sees (they refuse item assignment), kept apart so it does not hide the others
    diffs["container_type"] = 0.0 if _types(out_s) == _types(out_p) else float("inf")
    leaves_s, spec_s = tree_flatten(out_s)
    leaves_p, spec_p = tree_flatten(plain_containers(out_p))
    if spec_s != spec_p:
        return Verdict("wrong", f"output structure: serial {spec_s}, parallel {spec_p}",
                       {"structure": float("inf")})  # fmt: skip
    for i, (a, b) in enumerate(zip(leaves_s, leaves_p, strict=True)):
        diffs[f"output:{i}"] = _diff(a, b)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.requires_grad != b.requires_grad:
                diffs[f"requires_grad:{i}"] = float("inf")
    rank_outputs = getattr(par, "rank_outputs", None)
    if rank_outputs:
        per_rank = [tree_flatten(o)[0] for o in rank_outputs]
        for i, a in enumerate(leaves_s):
            if not isinstance(a, torch.Tensor):
                continue
            vals = [r[i] for r in per_rank if i < len(r)]
            if len(vals) == len(per_rank) and all(
                isinstance(v, torch.Tensor) and v.shape == a.shape for v in vals
            ):
                same = all(torch.equal(vals[0].detach(), v.detach()) for v in vals[1:])
                diffs[f"ranks_disagree:{i}"] = 0.0 if same else float("inf")
    for name, v in xs.items():
        diffs[f"input_after:{name}"] = _diff(v, xp[name])
    if any(v == float("inf") for k, v in diffs.items() if k.startswith("output:")):
        return Verdict("wrong", "an output differs in shape or by inf", diffs)
    total_s, total_p = _objective(out_s), _objective(out_p)  # one weighting of both
    # torch leaves Tensor.backward unannotated
    if total_s is not None:
        total_s.backward()  # type: ignore[no-untyped-call]
    try:
        if total_p is not None:
            total_p.backward()  # type: ignore[no-untyped-call]
        grads_p = grads_of(par)
    except AutoTPError as e:
        return Verdict("refused", f"in backward: {first_line(e)}")
    except Exception as e:  # noqa: BLE001
        return Verdict("crash", "in backward: " + _exc_text(e))
    for name, p in serial.named_parameters(remove_duplicate=False):
        if name not in grads_p:
            diffs[f"grad:{name}"] = float("inf")
        else:
            diffs[f"grad:{name}"] = _diff(p.grad, grads_p[name])
    for name, v in xs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            diffs[f"input_grad:{name}"] = _diff(v.grad, xp[name].grad)
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        return Verdict("wrong", "", bad)
    return Verdict("equal", f"largest difference {max(diffs.values(), default=0.0):.3g}")


def _objective(out: Any) -> torch.Tensor | None:
    """A scalar of every floating output (fixed random weights: the same for two outputs
    of one structure), or None where nothing in it needs a gradient."""
    g = torch.Generator().manual_seed(1234)
    total: torch.Tensor | None = None
    for a in tree_flatten(plain_containers(out))[0]:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            term = (a * torch.randn(a.shape, generator=g, dtype=a.dtype)).sum()
            total = term if total is None else total + term
    return total if isinstance(total, torch.Tensor) and total.requires_grad else None


def _train(
    par: nn.Module, serial: nn.Module, inputs: dict[str, Any],
    state_of: Callable[[nn.Module], dict[str, torch.Tensor]], verdict: Verdict,
) -> Verdict:  # fmt: skip
    """The loop users write, from the gradients both models hold: clip_grad_norm_ at half
    serial's first norm (so it clips), an AdamW step, another forward and backward, clip,
    step. The norms returned and the weights after must be serial's."""
    grads = [p.grad for p in serial.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if not 0.0 < float(norm) < float("inf"):
        return verdict
    limit = float(norm) / 2
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (serial, par)]
    diffs: dict[str, float] = {}
    try:
        for step in range(2):
            norms = []
            for m, opt in zip((serial, par), opts, strict=True):
                if step:
                    torch.manual_seed(4321)
                    loss = _objective(m(**_clone(inputs)))
                    if loss is None:
                        return verdict
                    loss.backward()  # type: ignore[no-untyped-call]  # torch: unannotated
                norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), limit)))
                opt.step()
                opt.zero_grad()
            diffs[f"clip_norm:{step}"] = abs(norms[0] - norms[1]) / max(norms[0], 1e-30)
        state = state_of(par)
    except AutoTPError as e:
        return Verdict("refused", f"in the training loop: {first_line(e)}")
    except Exception as e:  # noqa: BLE001
        return Verdict("crash", "in the training loop: " + _exc_text(e))
    for name, t in serial.state_dict().items():
        diffs[f"trained:{name}"] = _diff(t, state.get(name))
    bad = {k: v for k, v in diffs.items() if not v <= 1e-8}
    if bad:
        return Verdict("wrong", "after training steps", bad)
    return verdict


def _types(o: Any) -> Any:
    """The container types of `o`, as a nested structure of type names."""
    if isinstance(o, dict):
        return (type(o).__name__, tuple((k, _types(v)) for k, v in o.items()))
    if isinstance(o, (list, tuple)):
        return (type(o).__name__, tuple(_types(v) for v in o))
    return None


def _exc_text(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def check_case(
    case: ModelCase, *, seed: int = 0, atol: float = 1e-10, sequence_parallel: bool = False
) -> Verdict:
    """Simulate `case` at case.tp and compare with the serial model in float64. Raises
    only when the serial model itself fails (a generator bug). `sequence_parallel`: plan
    it so (autotp.plan's option)."""
    from ...parallel import full_grads, full_state_dict, simulate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial = case.build(seed)
        inputs = case.inputs(seed)
        try:
            sim = simulate(
                copy.deepcopy(serial), case.tp, _clone(inputs),
                sequence_parallel=sequence_parallel,
            )  # fmt: skip
        except AutoTPError as e:
            return Verdict("refused", first_line(e))
        except Exception as e:  # noqa: BLE001 - every other exception is the verdict
            return Verdict("crash", _exc_text(e))
        called = case.inputs(seed, case.call_sizes) if case.call_sizes else inputs
        return _compare(case, serial, sim, called, full_grads, atol, full_state_dict)


def _gloo_rank(
    rank: int, world: int, case: ModelCase, seed: int, atol: float, sequence_parallel: bool
) -> Verdict:
    from ...parallel import full_grads, full_state_dict, parallelize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serial = case.build(seed)
        inputs = case.inputs(seed)
        try:
            module = parallelize(
                copy.deepcopy(serial), world, _clone(inputs),
                sequence_parallel=sequence_parallel,
            )  # fmt: skip
        except AutoTPError as e:
            return Verdict("refused", first_line(e))
        except Exception as e:  # noqa: BLE001
            return Verdict("crash", _exc_text(e))
        called = case.inputs(seed, case.call_sizes) if case.call_sizes else inputs
        return _compare(case, serial, module, called, full_grads, atol, full_state_dict)


def check_case_gloo(
    case: ModelCase, *, seed: int = 0, atol: float = 1e-10, timeout: float = 120,
    sequence_parallel: bool = False,
) -> Verdict:  # fmt: skip
    """As check_case, with `autotp.parallelize` on case.tp forked gloo processes; the
    verdict of the first rank that is not "equal" (a rank that dies or hangs: "crash")."""
    from .. import run_on_gloo

    case.namespace()  # compile before the fork: every rank inherits the classes
    try:
        verdicts: list[Verdict] = run_on_gloo(
            _gloo_rank, case.tp, case, seed, atol, sequence_parallel, timeout=timeout
        )
    except AssertionError as e:
        return Verdict("crash", str(e)[-2000:])
    for r, v in enumerate(verdicts):
        if v.kind != "equal":
            v.detail = f"rank {r}: {v.detail}"
            return v
    return verdicts[0]
