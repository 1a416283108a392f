"""A drawn case and where its decisions come from: `Choices` (random, replayed from a
record, or drawn by hypothesis) and `ModelCase` (a model's source, inputs and modes,
compiled under a linecache-registered fake file name)."""

from __future__ import annotations

import hashlib
import linecache
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


class Choices:
    """Where the generator's decisions come from. `pick(options)` returns one option and
    `flag(p)` is True with probability about p; each decision is recorded as an index in
    `record`, so `Choices(replay=record)` rebuilds the same case. Index 0 is always the
    simplest option (and a False flag): a decision past the end of `replay` takes it."""

    def __init__(self, rng: random.Random | None = None, replay: Sequence[int] = ()) -> None:
        self.rng = rng
        self.replay = list(replay)
        self.record: list[int] = []

    def index(self, n: int, p_last: float | None = None) -> int:
        pos = len(self.record)
        if pos < len(self.replay):
            i = min(self.replay[pos], n - 1)
        elif self.rng is None:
            i = 0
        elif p_last is not None:
            i = int(self.rng.random() < p_last)
        else:
            i = self.rng.randrange(n)
        self.record.append(i)
        return i

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.index(len(options))]

    def flag(self, p: float) -> bool:
        return self.index(2, p) == 1


class _HypothesisChoices(Choices):
    def __init__(self, draw: Callable[[Any], Any]) -> None:
        super().__init__()
        self.draw = draw

    def index(self, n: int, p_last: float | None = None) -> int:
        from hypothesis import strategies as st

        if p_last is not None:  # shrinks to 0 -> False
            i = int(self.draw(st.integers(0, 99)) >= 100 - round(100 * p_last))
        else:
            i = self.draw(st.integers(0, n - 1))
        self.record.append(i)
        return i


@dataclass(frozen=True)
class ModelCase:
    """One drawn model: its source (defining `Model`), tp, the feature tags it uses, the
    code that makes its example inputs, the mode it is traced in and the mode it is then
    called in."""

    source: str
    inputs_source: str  # defines `inputs`, a dict of keyword arguments, from `seed`
    tp: int
    features: frozenset[str]
    mode: str = "train"  # the mode the model is built and traced in
    call_mode: str = "train"  # the mode both models are switched to before running
    record: tuple[int, ...] = field(default=(), repr=False)  # Choices(replay=record)
    class_name: str = "Model"
    sizes: tuple[int, int] = (2, 3)  # batch and sequence it is planned with
    call_sizes: tuple[int, int] | None = None  # and then called with, when drawn apart

    @property
    def filename(self) -> str:
        return f"<autotp-fuzz-{hashlib.sha1(self.source.encode()).hexdigest()[:12]}>"

    def namespace(self) -> dict[str, Any]:
        """The executed source (cached per source text), registered with linecache."""
        ns = _NAMESPACES.get(self.source)
        if ns is None:
            name = self.filename
            lines = self.source.splitlines(keepends=True)
            linecache.cache[name] = (len(self.source), None, lines, name)
            ns = {"__name__": "autotp_fuzz_case"}
            exec(compile(self.source, name, "exec"), ns)
            _NAMESPACES[self.source] = ns
        return ns

    def build(self, seed: int = 0) -> nn.Module:
        """The serial model in float64, parameters drawn from `seed`, in `mode`."""
        torch.manual_seed(seed)
        model: nn.Module = self.namespace()[self.class_name]().double()
        if self.mode == "eval":
            model.eval()
        return model

    def inputs(self, seed: int = 0, sizes: tuple[int, int] | None = None) -> dict[str, Any]:
        """The example inputs drawn from `seed`, of `sizes` (batch, sequence; default the
        sizes it is planned with)."""
        ns: dict[str, Any] = {"torch": torch, "seed": seed, "sizes": sizes or self.sizes}
        exec(self.inputs_source, ns)
        inputs: dict[str, Any] = ns["inputs"]
        return inputs

    def reproducer(self, seed: int = 0) -> str:
        """A self-contained script: the model, its inputs, and the comparison."""
        switch = (
            f"sim.train({self.call_mode == 'train'})\nmodel.train({self.call_mode == 'train'})\n"
            if self.call_mode != self.mode
            else ""
        )
        return (
            f"# autotp fuzz case: tp={self.tp}, traced in {self.mode}, run in "
            f"{self.call_mode}\n# features: {' '.join(sorted(self.features))}\n"
            f"{self.source}\n\n\nimport copy\n\nimport autotp\n\nseed = {seed}\n"
            f"torch.manual_seed(seed)\nmodel = Model().double()\n"
            + ("model.eval()\n" if self.mode == "eval" else "")
            + f"sizes = {self.sizes}\n{self.inputs_source}\n"
            f"sim = autotp.simulate(copy.deepcopy(model), {self.tp}, example_inputs=inputs)\n"
            + (f"sizes = {self.call_sizes}\n{self.inputs_source}\n" if self.call_sizes else "")
            + f"{switch}print(model(**inputs))\nprint(sim(**inputs))\n"
        )


_NAMESPACES: dict[str, dict[str, Any]] = {}
