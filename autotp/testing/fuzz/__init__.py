"""A structural fuzzer: small random models drawn from a grammar of structures and
spellings (a Csmith for model graphs), and the check that autotp either refuses each one
or computes exactly what it computes.

    from autotp.testing.fuzz import check_case, model_cases

    @given(model_cases())
    def test_fuzz(case):
        verdict = check_case(case)
        assert verdict.ok, f"{verdict}\\n{case.reproducer()}"

A drawn model is Python source text: an `nn.Module` class `Model` with helper classes,
written from grammar choices (blocks, residual patterns, spellings of linears, heads and
activations, output containers, and the things tracing tends to drop: hooks, no_grad,
custom autograd functions, dropout flags, modes, in-place input mutation, tied weights,
escapes of split values). The text is compiled under a fake file name registered with
`linecache`, so tracebacks and autotp's refusals quote the generated lines, and a failing
case prints as a self-contained script (`ModelCase.reproducer()`).

The generator reads every decision from a `Choices` object: random (bench/fuzz.py),
replayed from a recorded list of indices (shrinking: index 0 is always the simplest
option and a False flag), or drawn by hypothesis (`model_cases()`, which shrinks the
same way). Each decision that shapes the model adds a feature tag ("block:glu",
"linear:functional_kw", "trap:hook_fwd", "escape:mT", ...) to the case.

The package is in four parts: `tables` (the option tables and helper snippets), `case`
(`Choices`, `ModelCase`), `grammar` (the generator, `model_cases`, `random_case`,
`FEATURES` and `shrink`) and `oracle` (`Verdict`, `check_case`, `check_case_gloo`).
`check_case` compares in float64: every output leaf, every parameter gradient (through
`autotp.full_grads`), the gradients of inputs that require grad, inputs mutated in place,
and, where the simulated module exposes `rank_outputs`, that the ranks agree bitwise on
replicated outputs. `check_case_gloo` does the same with `autotp.parallelize` on real gloo
processes.
"""

from __future__ import annotations

from .case import Choices, ModelCase
from .grammar import generate, model_cases, random_case, shrink
from .oracle import Verdict, check_case, check_case_gloo
from .oracle import _compare as _compare  # tests compare a hand-built pair with it
from .tables import FEATURES

__all__ = [
    "Choices", "ModelCase", "Verdict", "FEATURES", "generate", "model_cases", "random_case",
    "check_case", "check_case_gloo", "shrink",
]  # fmt: skip
