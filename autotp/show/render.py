"""Stage 9, render: what a person reads in the terminal (rich). Reads only the plan, the
facts in report.py and the NodeRecord (`sites.record(node)`) the rewrite wrote.

Views: `summary` (module tree coloured by placement, with rules and collectives; per-rank
parameter bytes; communication per step), `graph` (the per-rank graph, changes
highlighted), `diff` (one layer, serial beside rewritten), `unmatched`, `error`.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from typing import Any

import torch.fx as fx
from rich.columns import Columns
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ..common.errors import AutoTPError
from ..common.tensor_names import common_prefix
from ..rewrite.sites import NodeRecord, record, site_kind
from ..runtime.collective_kinds import RUN_TEXT, SHOWN
from . import report
from .report import KIND_STYLE
from .shown import ShownPlan, ShownRegionPlan

__all__ = [
    "to_text", "plan_summary", "region_summary", "summary", "graph_view", "diff_view",
    "unmatched_view", "error_view",
]  # fmt: skip


def to_text(renderable: Any, width: int = 100) -> str:
    """Plain text of a renderable (no colour), as `print(plan)` shows it."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue().rstrip("\n")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _legend() -> Text:
    t = Text("placement: ")
    for kind in ("column", "row", "vocab", "replicated"):
        t.append(f"■ {kind}  ", style=KIND_STYLE[kind])
    t.append("◆ collective", style=KIND_STYLE["collective"])
    return t


def module_tree(plan: ShownPlan) -> Tree:
    """Modules as a tree: each parameter coloured by placement with serial -> local shape,
    each matched block labelled with its rule, each collective at the module it follows.
    Consecutive layers identical to the one before are folded into one line."""
    rows = report.params(plan)
    rules_at: dict[str, str] = {}
    for m in plan.matches:
        paths = [li.weight.rsplit(".", 1)[0] for li in m.layers.values()]
        rules_at[common_prefix(paths)] = m.rule.name
    shown = {""}  # module paths that appear in the tree (those holding parameters)
    for r in rows:
        parts = r.name.split(".")[:-1]
        shown.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    colls: dict[str, list[str]] = defaultdict(list)
    for c in report.communication(plan):
        text = RUN_TEXT[(c.kind, c.direction)]
        where = "" if c.module == "<root>" else c.module
        at = where
        while at not in shown:  # a module without parameters: mark it at its parent
            at = at.rpartition(".")[0]
        if at != where:
            text += f" (at {where[len(at) :].lstrip('.')})"
        colls[at or "<root>"].append(text)

    root: dict[str, Any] = {}
    for r in rows:
        *path, leaf = r.name.split(".")
        node = root
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = r
    tree = Tree(Text(f"{plan.model_name}  (tp={plan.tp}, front-end {plan.traced.frontend})",
                     style="bold"))  # fmt: skip
    for marker in colls.get("<root>", []):
        tree.add(Text(f"◆ {marker}  (loss)", style=KIND_STYLE["collective"]))
    _fill(tree, root, "", rules_at, colls)
    return tree


def _label(name: str, path: str, rules_at: dict[str, str], colls: dict[str, list[str]]) -> Text:
    t = Text(name)
    if path in rules_at:
        t.append(f"  [{rules_at[path]}]", style="bold")
    for marker in colls.get(path, []):
        t.append(f"  ◆ {marker}", style=KIND_STYLE["collective"])
    return t


def _leaf(name: str, r: report.ParamRow) -> Text:
    shape = f"{list(r.serial_shape)}"
    if r.local_shape != r.serial_shape:
        shape += f" -> {list(r.local_shape)}"
    tied = f" (tied to {r.tied_to})" if r.tied_to else ""
    return Text(f"{name} {shape} {r.kind}{tied}", style=KIND_STYLE[r.kind])


def _signature(node: Any, path: str, rules_at: dict[str, str], colls: dict[str, list[str]]) -> Any:
    if isinstance(node, report.ParamRow):
        return (node.kind, node.serial_shape, node.local_shape, node.rule, bool(node.tied_to))
    return (
        rules_at.get(path),
        tuple(colls.get(path, [])),
        tuple((k, _signature(v, f"{path}.{k}" if path else k, rules_at, colls))
              for k, v in node.items()),
    )  # fmt: skip


def _fill(
    tree: Tree,
    node: dict[str, Any],
    path: str,
    rules_at: dict[str, str],
    colls: dict[str, list[str]],
) -> None:
    keys = list(node)
    i = 0
    while i < len(keys):
        k = keys[i]
        sub = f"{path}.{k}" if path else k
        child = node[k]
        if isinstance(child, report.ParamRow):
            tree.add(_leaf(k, child))
            i += 1
            continue
        branch = tree.add(_label(k, sub, rules_at, colls))
        _fill(branch, child, sub, rules_at, colls)
        # fold the following numbered siblings that look exactly like this one
        j = i + 1
        if k.isdigit():
            sig = _signature(child, "", {}, {})
            sig_full = _signature(child, sub, rules_at, colls)
            while j < len(keys) and keys[j].isdigit():
                other = f"{path}.{keys[j]}" if path else keys[j]
                if _signature(node[keys[j]], "", {}, {}) != sig:
                    break
                if _strip_index(_signature(node[keys[j]], other, rules_at, colls), keys[j]) != (
                    _strip_index(sig_full, k)
                ):
                    break
                j += 1
            n_coll = sum(len(v) for p, v in colls.items() if p == sub or p.startswith(sub + "."))
            each = f" (◆ {n_coll} collectives each)" if n_coll else ""
            if j == i + 2:
                tree.add(Text(f"{keys[i + 1]}: same as {k}{each}", style="italic"))
            elif j > i + 2:
                tree.add(Text(f"{keys[i + 1]} … {keys[j - 1]}: {j - i - 1} more, same as {k}"
                              f"{each}", style="italic"))  # fmt: skip
        i = j


def _strip_index(sig: Any, index: str) -> str:
    return re.sub(rf"\b{index}\b", "#", repr(sig))


def params_table(plan: ShownPlan) -> Table:
    rows = [r for r in report.params(plan) if r.tied_to is None]
    t = Table(title=f"parameters per rank (tp={plan.tp})", title_justify="left")
    for col in ("placement", "tensors", "serial", "per rank"):
        t.add_column(col, justify="right" if col != "placement" else "left")
    total_s = total_l = 0
    for kind in ("column", "row", "vocab", "replicated"):
        sel = [r for r in rows if r.kind == kind]
        if not sel:
            continue
        s, loc = sum(r.serial_bytes for r in sel), sum(r.local_bytes for r in sel)
        total_s, total_l = total_s + s, total_l + loc
        t.add_row(Text(kind, style=KIND_STYLE[kind]), str(len(sel)), _mib(s), _mib(loc))
    ratio = f"{total_l / total_s:.3f} of serial" if total_s else ""
    t.add_row(Text("total", style="bold"), str(len(rows)), _mib(total_s), _mib(total_l))
    t.caption = ratio
    return t


def comm_table(plan: ShownPlan) -> Table:
    rows = report.communication(plan)
    shape = plan.traced.inputs
    dims = next((tuple(v.shape) for v in shape.values() if hasattr(v, "shape")), ())
    t = Table(title=f"communicated per training step, per rank (inputs {list(dims)})",
              title_justify="left")  # fmt: skip
    for col in ("collective", "where", "calls", "elements each", "bytes"):
        t.add_column(col, justify="right" if col in ("calls", "elements each", "bytes") else "left")
    groups: dict[tuple[str, str, str, int], list[report.CommRow]] = defaultdict(list)
    for c in rows:
        groups[(c.kind, c.direction, c.rule, c.elements)].append(c)
    for (kind, direction, rule, elements), cs in groups.items():
        label = Text(RUN_TEXT[(kind, direction)], style=KIND_STYLE["collective"])
        nbytes = _mib(sum(c.bytes for c in cs))
        t.add_row(label, rule or "-", str(len(cs)), f"{elements:,}", nbytes)
    ring = sum(c.ring_bytes(plan.tp) for c in rows)
    t.caption = (
        f"total {_mib(sum(c.bytes for c in rows))} in {len(rows)} collectives; "
        f"{_mib(int(ring))} sent per rank on a ring"
    )
    return t


def collectives_line(plan: ShownPlan) -> Text:
    """The plan's collectives per step in one line, each count named as the registry
    says (`SHOWN`): f and g always, the loss's and the outputs' where the plan has any,
    sequence parallelism's where it has them."""
    coll = plan.collectives()

    def group(name: str) -> str:
        return ", ".join(f"{coll.get(n, 0)} {text}" for n, (g, text) in SHOWN.items() if g == name)

    line = f"collectives per step: {group('tensor')}"
    if any(coll.get(n) for n, (g, _) in SHOWN.items() if g == "loss"):
        line += f", {group('loss')}"
    sequence = [n for n, (g, _) in SHOWN.items() if g == "sequence"]
    if plan.sequence_parallel and plan.tp > 1 and not any(n in coll for n in sequence):
        line += (
            "; sequence parallel asked for, but no sum could be split along a sequence "
            "(none has one whose length tp divides): all-reduces instead"
        )
    elif any(n in coll for n in sequence):
        line += f"; sequence parallel: {group('sequence')}"
    return Text(line)


def unmatched_view(plan: ShownPlan) -> Table | Text:
    reasons = report.unmatched_reasons(plan)
    if not reasons:
        return Text("every linear layer is split; nothing left replicated")
    title = "left replicated (no rule matched"
    title += ", or its split not proven)" if plan.replicated else ")"
    t = Table(title=title, title_justify="left")
    t.add_column("linear", overflow="fold")
    t.add_column("shape", no_wrap=True)
    t.add_column("why", overflow="fold")
    shapes = {li.weight: f"{li.in_features} -> {li.out_features}" for li in plan.unmatched}
    for weight, why in reasons:
        t.add_row(Text(weight, style=KIND_STYLE["replicated"]), shapes[weight], why)
    return t


def plan_summary(plan: ShownPlan) -> Group:
    """The default view: rules, the module tree, bytes per rank, communication."""
    matched = Table(title="matched structures", title_justify="left")
    for col in ("rule", "count", "split"):
        matched.add_column(col)
    seen: dict[str, int] = defaultdict(int)
    how: dict[str, str] = {}
    for m in plan.matches:
        seen[m.rule.name] += 1
        how[m.rule.name] = ", ".join(f"{k}: {v}" for k, v in m.rule.split.items())
    for name, count in seen.items():
        matched.add_row(name, str(count), how[name])
    parts: list[Any] = [
        Text(f"autotp plan: {plan.model_name} over tp={plan.tp}", style="bold"),
        _legend(),
        module_tree(plan),
        matched,
        params_table(plan),
        comm_table(plan),
        collectives_line(plan),
    ]
    if plan.unmatched:
        parts.append(unmatched_view(plan))
    return Group(*parts)


def region_summary(plan: ShownRegionPlan) -> Group:
    """The view of a RegionPlan: each region (repeated layers of one program on one
    line) with its rules, what is split, the placements at its boundary and its
    collective sites; then the model's split fraction, collectives and notes."""
    t = Table(title="regions (the model's own Python runs between them, replicated)",
              title_justify="left")  # fmt: skip
    t.add_column("region", overflow="fold")
    t.add_column("rules", overflow="fold")
    t.add_column("split")
    t.add_column("in -> out", overflow="fold")
    t.add_column("f/g/gather")
    for group in plan.groups():
        r = group[0]
        where = r.path if len(group) == 1 else f"{r.path} .. {group[-1].path} (x{len(group)})"
        rules = sorted({m.rule.name for m in r.plan.matches}) or ["-"]
        ins, outs = r.boundary()
        c = r.plan.collectives()
        t.add_row(f"{where}\n{r.cls.__name__}", ", ".join(rules),
                  f"{len(r.splits)} of {len(r.shapes)}",
                  f"{', '.join(ins)} -> {', '.join(outs)}",
                  f"{c['f']}/{c['g']}/{c['gather']}")  # fmt: skip
    coll = plan.collectives()
    parts: list[Any] = [
        Text(
            f"autotp plan: {plan.model_name} over tp={plan.tp}, {len(plan.regions)} regions "
            f"(fingerprint {plan.fingerprint})",
            style="bold",
        ),  # fmt: skip
        t,
        Text(f"split: {plan.split_fraction():.1%} of the parameter and buffer elements"),
        Text(
            f"collective sites per forward: {coll['g']} all-reduce forward (g), {coll['f']} "
            f"all-reduce backward (f; none on a value without gradient), {coll['gather']} "
            "all-gather forward (outputs)"
        ),  # fmt: skip
    ]
    if plan.sequence_parallel:
        parts.append(Text(
            f"sequence parallel: {coll.get('reduce_scatter', 0)} reduce-scatter forward, "
            f"{coll.get('sp_gather', 0)} all-gather for split compute, "
            f"{coll.get('sequence_gather', 0)} sequence read whole"
        ))  # fmt: skip
    parts += [Text(f"note: {note}") for note in plan.notes()]
    return Group(*parts)


summary = plan_summary


def _arg_text(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg_text(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    return repr(a)


def _target(n: fx.Node) -> str:
    info = record(n)
    if n.op == "call_module" and (info.collective or info.dropout):
        return site_kind(n.target)  # a per-call-site module: its kind says what it does
    if n.op in ("call_module", "get_attr"):
        return str(n.target)
    t = n.target
    name = getattr(t, "__name__", None) or str(t)
    return name.replace("torch.ops.", "") if n.op == "call_function" else f".{t}"


def _node_table(nodes: list[fx.Node], title: str, highlight: bool) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for col in ("node", "op", "args", "placement", "change"):
        t.add_column(col, overflow="fold")
    for n in nodes:
        if n.op in ("placeholder", "output") and not highlight:
            continue
        info = record(n) if highlight else NodeRecord()
        style = ""
        change = []
        if info.collective:
            style = KIND_STYLE["collective"]
            change.append(f"◆ {info.collective}: {info.why or ''}")
        if info.edits:
            change.append("shape " + "; ".join(info.edits))
            style = style or KIND_STYLE["edit"]
        if info.split:
            style = style or KIND_STYLE.get(str(info.split).split()[0], "")
            change.append(f"{info.split} shard of {info.weight or ''}")
        if info.dropout:
            change.append(f"dropout stream: {info.dropout}")
        args = ", ".join(_arg_text(a) for a in n.args)
        t.add_row(Text(n.name, style=style), _target(n), args, info.placement or "",
                  Text("\n".join(change), style=style))  # fmt: skip
    return t


def graph_view(plan: ShownPlan, layer: int | None = None) -> Table:
    """The per-rank graph (identical on every rank), node by node; new collectives,
    split layers and rewritten shape constants highlighted."""
    nodes = list(plan.graph.nodes) if layer is None else report.layer_nodes(plan.graph, layer)
    where = "" if layer is None else f", layer {layer}"
    return _node_table(nodes, f"per-rank graph (tp={plan.tp}{where})", highlight=True)


def diff_view(plan: ShownPlan, layer: int) -> Columns:
    """Layer `layer`, serial graph beside the rewritten one."""
    serial = report.layer_nodes(plan.traced.gm.graph, layer)
    rewritten = report.layer_nodes(plan.graph, layer)
    if not serial:
        raise IndexError(f"no layer {layer} in {plan.model_name}")
    return Columns(
        [
            _node_table(serial, f"serial, layer {layer}", highlight=False),
            _node_table(rewritten, f"rank graph, layer {layer} (tp={plan.tp})", highlight=True),
        ],
        equal=True,
        expand=True,
    )


def error_view(err: Exception) -> Panel:
    """An AutoTPError as a person should see it: what, where, what to do, under a title
    that says which kind of problem it is. Read from the error's fields (what, where,
    hint), never from its text; another exception shows its text."""
    text = Text()
    if not isinstance(err, AutoTPError):
        lines = str(err).splitlines() or [type(err).__name__]
        text.append(lines[0] + "\n", style="bold red")
        text.append("".join(line + "\n" for line in lines[1:]))
        return Panel(text, title=AutoTPError.title, border_style="red")
    if err.where:
        text.append(err.what + "\n", style="bold red")
        for key, value in err.where.items():
            text.append(f"{key:>7s}: ", style="bold")
            text.append(value + "\n")
    else:
        lines = err.message.splitlines() or [""]
        text.append(lines[0] + "\n", style="bold red")
        text.append("".join(line + "\n" for line in lines[1:]))
    if err.hint:
        text.append("   hint: ", style="bold")
        text.append(err.hint + "\n", style="green")
    return Panel(text, title=err.title, border_style="red")
