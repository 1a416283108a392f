"""Stage 9, render: what a person reads in the terminal. Reads only plan data and
`node.meta["autotp"]`, which the passes wrote."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

__all__ = ["plan_summary", "to_text"]


def to_text(renderable: Any, width: int = 100) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue().rstrip("\n")


def plan_summary(plan: Any) -> Group:
    """Matched rules, split weights, inserted collectives, unmatched layers."""
    title = Text(f"autotp plan: {plan.model_name} over tp={plan.tp}", style="bold")
    rules = Table(title="matched structures", show_lines=False, expand=False)
    rules.add_column("rule")
    rules.add_column("module")
    rules.add_column("split")
    for m in plan.matches:
        parts = ", ".join(
            f"{li.weight.rsplit('.', 1)[0].rsplit('.', 1)[-1]}: {m.rule.split[k]}"
            for k, li in m.layers.items()
        )
        first = min(m.layers.values(), key=lambda li: li.weight).weight
        rules.add_row(m.rule.name, first.rsplit(".", 2)[0], parts)
    coll = plan.collectives()
    extra = ""
    if coll["max"] or coll["gather"]:
        extra = f", {coll['max']} all-reduce max (loss), {coll['gather']} all-gather (outputs)"
    comm = Text(
        f"collectives per step: {coll['g']} all-reduce forward (g), "
        f"{coll['f']} all-reduce backward (f){extra}"
    )
    splits = plan.splits
    n_split = sum(1 for _ in splits)
    weights = Text(f"split parameters: {n_split}; all others replicated")
    parts: list[Any] = [title, rules, weights, comm]
    if plan.unmatched:
        un = Table(title="left replicated (no rule matched)")
        un.add_column("linear")
        un.add_column("shape")
        for li in plan.unmatched:
            un.add_row(li.weight, f"{li.in_features} -> {li.out_features}")
        parts.append(un)
    return Group(*parts)
