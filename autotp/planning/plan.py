"""`plan`: the whole pipeline short of weights: trace, match, propagate, rewrite.

A Plan is pure data about the model; it holds no process group and copies no weight
(the traced graph module shares the model's tensors, read only). It prints as a summary
(render.py) in plain `print` and in rich.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.trace import Frontend, Traced, trace
from ..common.errors import AutoTPError, module_path, source_line
from ..common.hooks import hooks_of
from ..common.tensor_names import names_by_tensor
from ..integrations.hf import collects as _collects
from ..match import ops
from ..match.patterns import LinearInfo, Match, Unsplit, find_embeddings, find_linears, match
from ..match.rule import Rule
from ..rewrite.graph import rewrite
from ..rewrite.sites import record
from ..runtime.collective_kinds import ALWAYS, NAMES
from ..sharding import Propagation, Shard, VocabOptions, is_split, propagate

__all__ = ["Plan", "plan", "model_signature", "check_signature"]

# a model's tensors as planning saw them: (name, shape) of each, sorted, and the groups
# of names one tensor has (ties)
Signature = tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, ...], ...]]


@dataclass(frozen=True, eq=False)
class Plan:
    """How one model splits over `tp` ranks. Build it with `autotp.plan`."""

    model_name: str
    tp: int
    traced: Traced
    matches: list[Match]
    linears: dict[fx.Node, LinearInfo]
    propagation: Propagation
    graph: fx.Graph  # the per-rank graph (identical on every rank)
    rules: tuple[Rule, ...] = field(default=())
    vocab: VocabOptions = field(default_factory=VocabOptions)
    # matched blocks propagation could not prove, left replicated, with why
    replicated: tuple[Unsplit, ...] = field(default=())
    # the planned model's tensors: (name, shape) and groups of tied names
    signature: Signature = field(default=((), ()))
    sequence_parallel: bool = False

    def check_fits(self, model: nn.Module) -> None:
        """Refuse `model` unless it has the tensors this plan was made for (names, shapes,
        ties): a plan made on one instance (e.g. on the meta device) serves any other."""
        check_signature(self.model_name, self.signature, model)

    @functools.cached_property
    def splits(self) -> dict[str, Shard]:
        """Parameter name -> split, for every split parameter (tied names included)."""
        out = dict(self.propagation.params)
        by_id = names_by_tensor(self.traced.gm, buffers=False)
        for name, spec in list(out.items()):
            p = self.traced.gm.get_parameter(name)
            for alias in by_id.get(id(p), []):
                out[alias] = spec
        return out

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of everything a rank builds from the plan: the per-rank graph's code
        and every parameter's split. Equal plans give equal fingerprints in any process."""
        h = hashlib.sha256(self.graph.python_code("self").src.encode())
        h.update(repr(sorted((k, str(v)) for k, v in self.splits.items())).encode())
        h.update(repr((self.tp, self.vocab)).encode())
        return h.hexdigest()[:16]

    @property
    def serial_sizes(self) -> dict[str, int]:
        """For parameters split along a padded dimension: that dimension's serial size."""
        gm = self.traced.gm
        return {
            name: gm.get_parameter(name).shape[spec.dim]
            for name, spec in self.splits.items()
            if spec.padded is not None
        }

    @property
    def unmatched(self) -> list[LinearInfo]:
        """Linear layers no rule matched: they stay replicated."""
        split = {li.node for m in self.matches for li in m.layers.values()}
        return [li for n, li in self.linears.items() if n not in split]

    def collectives(self) -> dict[str, int]:
        """Collective call sites in the per-rank graph: f (all-reduce backward), g (all-reduce
        forward), max (all-reduce max forward), gather (all-gather forward); with sequence
        parallelism reduce_scatter (in g's place), sp_gather (in f's place),
        sequence_gather (a sequence read whole) and scatter (a replicated term cut to the
        rank's part of the sequence), where the plan has them."""
        kinds = [record(n).collective for n in self.graph.nodes]
        counts = {k: kinds.count(k) for k in NAMES}
        return {k: v for k, v in counts.items() if v or k in ALWAYS}

    def __rich__(self) -> Any:
        from ..show.render import plan_summary

        return plan_summary(self)

    def __str__(self) -> str:
        from ..show.render import to_text

        return to_text(self.__rich__())

    __repr__ = __str__


def check_signature(model_name: str, signature: Signature, model: nn.Module) -> None:
    """Refuse `model` unless its tensors (names, shapes, ties) are `signature`'s."""
    shapes, ties = model_signature(model)
    mine, theirs = dict(signature[0]), dict(shapes)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            have = "absent" if name not in theirs else f"shape {list(theirs[name])}"
            want = "absent" if name not in mine else f"shape {list(mine[name])}"
            raise AutoTPError(
                f"this plan was made for a {model_name} whose tensor {name} is "
                f"{want}, but the model given has it {have}",
                hint="plan the model "
                "you parallelize (autotp.plan(model, tp)), or build it the same way",
            )
    if signature[1] != ties:
        raise AutoTPError(
            f"this plan was made for a {model_name} whose tied weights differ from "
            "the model given (e.g. an output layer tied to the embedding in one only)",
            hint="plan the model you parallelize",
        )


def model_signature(model: nn.Module) -> Signature:
    """(name, shape) of every parameter and buffer, and the groups of tied names."""
    tensors = [*model.named_parameters(remove_duplicate=False),
               *model.named_buffers(remove_duplicate=False)]  # fmt: skip
    shapes = tuple(sorted((name, tuple(t.shape)) for name, t in tensors))
    ties = tuple(sorted(tuple(sorted(g)) for g in names_by_tensor(model).values() if len(g) > 1))
    return shapes, ties


def check_tp(tp: object) -> None:
    """Refuse a tp that is not a positive integer."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise AutoTPError(f"tp must be an integer >= 1, got {tp!r}")


def rules_or_default(rules: Sequence[Rule] | None) -> tuple[Rule, ...]:
    """`rules` as given, or autotp.rules' DEFAULT_RULES."""
    if rules is None:
        from autotp.rules import DEFAULT_RULES

        return tuple(DEFAULT_RULES)
    return tuple(rules)


def plan(
    model: nn.Module,
    tp: int,
    example_inputs: Any = None,
    *,
    rules: Sequence[Rule] | None = None,
    vocab: VocabOptions | None = None,
    frontend: Frontend = "auto",
    strict: bool = False,
    sequence_parallel: bool = False,
) -> Plan:
    """Plan the tensor-parallel split of `model` over `tp` ranks. Pure: nothing is copied,
    the model is not modified, no process group is needed.

    A matched block whose sharding cannot be proven stays replicated (always correct) and
    is listed in `plan.replicated` with the reason; the rest is still split. `strict`
    refuses instead, and so does a plan in which nothing would be split at all.

    `example_inputs` is a tuple of positional arguments or a dict of keyword arguments for
    `model.forward` (default: `model.example_inputs()` if the model has one). They fix
    which optional arguments the parallel module takes (e.g. targets for a loss).
    `vocab` sets the vocabulary padding and whether split outputs (logits) are gathered.
    `frontend` picks how the model is captured: "fx", "export" (torch.export, for models
    fx cannot trace, e.g. Hugging Face transformers), or "auto" (fx, then export).
    `sequence_parallel` (Megatron-LM's, Korthikanti et al. 2022): between split blocks each
    rank holds 1/tp of the sequence (norms, dropout, residuals), the all-reduce after a
    row-split block becomes a reduce-scatter and f before a column-split block an
    all-gather (the same bytes); the sequence length must then be a multiple of tp.
    """
    check_tp(tp)
    rules = rules_or_default(rules)
    try:
        return _plan(
            model, tp, example_inputs, rules, vocab, frontend, strict,
            sequence_parallel=sequence_parallel,
        )  # fmt: skip
    except AutoTPError:
        raise
    except Exception as e:  # noqa: BLE001 - never another exception type for a model
        raise AutoTPError(
            f"autotp failed while planning {type(model).__name__} at tp={tp}: "
            f"{type(e).__name__}: {e}",
            hint="this is a bug in autotp, not in your model; "
            "please report it with the model (the model itself is untouched)",
        ) from e


def _plan(
    model: nn.Module,
    tp: int,
    example_inputs: Any,
    rules: Sequence[Rule],
    vocab: VocabOptions | None,
    frontend: Frontend,
    strict: bool,
    *,
    dims: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    like: Plan | None = None,
    sequence_parallel: bool = False,
    tables: frozenset[str] = frozenset(),
) -> Plan:
    """The pipeline. `dims` and `inputs`: see `trace` and `propagate`; `tables`: see
    match.Context. `like`: a plan of
    another capture of the same module (another way of calling it) whose splits this one
    must keep: its layers are split as there, found by weight name, and proven again here;
    nothing is matched and nothing narrowed (the shards already exist)."""
    with torch.no_grad():
        traced = trace(model, example_inputs, frontend, dims)
    gm = traced.gm
    linears = find_linears(gm)
    vocab = vocab or VocabOptions()
    if like is None:
        matches = match(gm, rules, linears, tables)
        prop, matches, replicated = _propagate(
            gm, tp, linears, matches, vocab, strict, inputs, sequence_parallel
        )
    else:
        matches, replicated = _same_splits(like, gm, linears), list(like.replicated)
        splits = {n: s for m in matches for n, s in m.splits().items()}
        names = {n: m.rule.name for m in matches for n in m.splits()}
        prop = propagate(gm, tp, linears, splits, vocab, names, inputs, sequence_parallel)
    _check_hooks(model, gm, prop)
    graph = rewrite(gm, prop, matches, tp)
    return Plan(
        type(model).__name__, tp, traced, matches, linears, prop, graph, tuple(rules), vocab,
        tuple(replicated), model_signature(model), sequence_parallel,
    )  # fmt: skip


def _same_splits(like: Plan, gm: fx.GraphModule, linears: dict[fx.Node, LinearInfo]) -> list[Match]:
    """`like`'s matches over `gm`'s layers of the same weights (embeddings included)."""
    layers: dict[str, Any] = {li.weight: li for li in find_embeddings(gm).values()}
    layers.update({li.weight: li for li in linears.values()})
    out = []
    for m in like.matches:
        found = {k: layers[li.weight] for k, li in m.layers.items() if li.weight in layers}
        if found:
            out.append(Match(m.rule, {}, found))
    return out


def _propagate(
    gm: fx.GraphModule, tp: int, linears: dict[fx.Node, LinearInfo], matches: list[Match],
    vocab: VocabOptions, strict: bool, inputs: dict[str, Any] | None = None,
    sequence_parallel: bool = False,
) -> tuple[Propagation, list[Match], list[Unsplit]]:  # fmt: skip
    """Propagate the matched splits; when a refusal names a node, leave the block that
    split the value reaching it replicated and propagate again (feedback to matching).
    A block whose rule has a narrower fallback split (attention with its key/value
    projections replicated) gets that first. Each round narrows or drops one block, so
    this ends; a plan with no block left is refused with
    the first refusal, since the user asked for tensor parallelism and would get none."""
    replicated: list[Unsplit] = []
    reasons: dict[int, str] = {}  # a narrowed block -> why its first split was refused
    first: AutoTPError | None = None
    while True:
        splits = {n: s for m in matches for n, s in m.splits().items()}
        names = {n: m.rule.name for m in matches for n in m.splits()}
        try:
            prop = propagate(gm, tp, linears, splits, vocab, names, inputs, sequence_parallel)
            return prop, matches, replicated
        except AutoTPError as e:
            first = first or e
            culprit = None if strict else _culprit(gm, matches, e.node)
            if culprit is None or e.node is None:  # no node: nothing to blame (_culprit)
                raise
            where = f" ({module_path(e.node)}, {source_line(e.node)})"
            why = reasons.pop(id(culprit), e.what + where)  # the first split's refusal
            narrowed = culprit.narrowed(tp)  # first its rule's narrower splits, then nothing
            if narrowed is not None:
                matches = [narrowed[0] if m is culprit else m for m in matches]
                if narrowed[1].layers:
                    replicated.append(Unsplit(narrowed[1], why))
                else:  # the same layers, more ranks per slice: remembered for a later drop
                    reasons[id(narrowed[0])] = why
                continue
            matches = [m for m in matches if m is not culprit]
            replicated.append(Unsplit(culprit, why))
            if not matches:
                raise first from None


def _culprit(gm: fx.GraphModule, matches: list[Match], node: fx.Node | None) -> Match | None:
    """The matched block whose split reached `node`: of the blocks with a node upstream of
    it, the one that comes last in the graph (the value a block splits is joined again by
    its own row-split linear, so the nearest block upstream is the one still open)."""
    if node is None:
        return None
    upstream: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in upstream:
            upstream.add(n)
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    best, best_at = None, -1
    for m in matches:
        mine = [*m.nodes.values(), *(li.node for li in m.layers.values())]
        at = max((order[n] for n in mine if n in upstream), default=-1)
        if at > best_at:
            best, best_at = m, at
    return best


def _check_hooks(model: nn.Module, gm: fx.GraphModule, prop: Propagation) -> None:
    """Module hooks survive only on a module the per-rank graph still calls, whole, on
    replicated values: fx inlines every other module (its hooks would silently not run),
    the rewrite replaces split layers and dropouts, and a hook on a split value would see
    a shard. Anything else with a hook is refused, but for the modules `model` names in
    `autotp_hooks_outside`, whose own hooks run outside the graph (a region's, around it),
    and, inside those, the hooks transformers installs to collect outputs (the parallel
    model's region collects them)."""
    outside = set(getattr(model, "autotp_hooks_outside", ()))
    kept: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n not in prop.splits and ops.op_name(n, gm) != "dropout":
            kept.setdefault(str(n.target), n)
    for path, mod in model.named_modules():
        inside = any(path.startswith(o + ".") for o in outside)
        ignore = _collects if inside else (lambda hook: False)
        kinds = list(dict.fromkeys(what for _, what, _ in hooks_of(mod, ignore)))
        if not kinds or path in outside:
            continue
        node = kept.get(path)
        split = node is not None and any(
            a in prop.placements and is_split(prop.placements[a])
            for a in [node, *node.all_input_nodes]
        )
        if node is not None and not split:
            continue
        why = (
            "it is called on split values, so its hook would see a shard"
            if split
            else "the parallel module does not call this module as such (tracing inlines it, "
            "or the rewrite replaces it), so the hook would silently not run"
        )
        raise AutoTPError(
            f"module {path or '<root>'} ({type(mod).__name__}) has a {' and a '.join(kinds)}: "
            f"{why}.",
            hint="remove the hook before planning (handle.remove()) and, if "
            "you need it, register it on the parallel module (a forward hook on the module "
            "autotp returns sees the same inputs and outputs as on the serial model)",
        )
