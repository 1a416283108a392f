"""What a run leaves to look at: `metrics.jsonl` in the run folder, and what it prints.

    {"kind": "train", "step": 10, "loss": 4.91, "lr": 0.0004, "grad_norm": 1.73,
     "tokens_per_s": 12345.6, "elapsed_s": 8.2}
    {"kind": "val", "step": 800, "val_loss": 2.03, "val_perplexity": 7.63, "elapsed_s": 141.0}
    {"kind": "resume", "step": 400, "checkpoint": "step_00000400", "elapsed_s": 0.0}

One JSON object a line, appended across resumes. A resume first drops the rows after the
step it resumed from (those steps are trained again, identically), so each step appears
once. `pandas.read_json(path, lines=True)` reads it.

On a terminal the runner draws a live bar (rich); anywhere else (a file, a pipe, a job
scheduler's log) it prints one plain line per logged step instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["MetricsLog", "Reporter", "read_metrics", "say"]


def say(line: str) -> None:
    """Tell the user one line, on stderr (what a command reports beside its output)."""
    Console(stderr=True).print(line, highlight=False)


class MetricsLog:
    """Appends rows to `path` (None: a log that keeps nothing)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)

    def rewind(self, step: int) -> None:
        """Keep only the rows of the steps before `step`, and its train row: a resume
        trains the later steps again and validates again (a torn last line goes too)."""
        if self.path is None or not self.path.exists():
            return
        kept = [
            row for row in read_metrics(self.path)
            if row.get("step", 0) < step or (row.get("step") == step and row.get("kind") == "train")
        ]  # fmt: skip
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class Reporter:
    """The runner's output on the lead rank: a live bar on a terminal, plain lines
    elsewhere; silent when not enabled (other ranks, or --no-progress)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled = enabled
        self.console = Console(file=sys.stdout)
        self.live = enabled and self.console.is_terminal
        self.total = total
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(), console=self.console, disable=not self.live,
        )  # fmt: skip
        self.task = self.bar.add_task("training", total=total, completed=done,
                                      loss=float("nan"), tps=0.0)  # fmt: skip

    def __enter__(self) -> Reporter:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def say(self, text: str) -> None:
        """One line for the user (above the bar on a terminal)."""
        if self.enabled:
            self.console.print(text, highlight=False)

    def step(self, step: int, loss: float, tps: float, row: dict[str, Any] | None) -> None:
        """After each optimizer step; `row` is the metrics row when this step is logged."""
        if self.live:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps)
        elif self.enabled and row is not None:
            norm = row.get("grad_norm")
            self.console.print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {row['lr']:.3e}  "
                + (f"grad_norm {norm:.3f}  " if norm is not None else "")
                + f"{tps:,.0f} tok/s  {row['elapsed_s']:.1f} s",
                highlight=False,
            )
