"""Plans are the same in every process: every rank plans on its own, so matching and
planning must not depend on the hash seed, dict order or memory layout; `parallelize`
checks that the ranks agree and names the ones that do not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import autotp
from autotp.models import build
from autotp.testing import run_on_gloo

_PLAN = """
import json, torch, autotp
from autotp.models import build
out = {}
cases = [("gpt2-tiny", {"n_layer": 2}, False), ("bert-tiny", {}, False),
         ("gpt2-tiny", {"n_head": 3, "n_embd": 12}, False),
         ("gpt2-tiny", {"n_head": 3, "n_embd": 12}, True)]
for name, over, strict in cases:
    torch.manual_seed(0)
    model = build(name, **over)
    try:
        plan = autotp.plan(model, 2, strict=strict)
        out[name + str(over) + str(strict)] = [
            plan.fingerprint, [m.rule.name for m in plan.matches],
            [why for _, why in plan.replicated]]
    except autotp.AutoTPError as e:
        out[name + str(over) + str(strict)] = str(e)
try:  # the key a transformers model's plan is stored under (autotp.planning.cache)
    import transformers
except ImportError:  # the hf extra is not installed: no key to compare
    transformers = None
if transformers is not None:
    import os
    from autotp.planning import cache as plan_cache
    from autotp.planning.plan import rules_or_default
    os.environ["AUTOTP_PLAN_CACHE"] = "unused"
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=101)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    given = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "use_cache": False}
    out["key"] = plan_cache.program_key(hf, 2, given, rules_or_default(None), False, False)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_plans_are_identical_whatever_the_hash_seed() -> None:
    results = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _PLAN], env=env, capture_output=True, text=True, check=True
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert results[0] == results[1]
    if importlib.util.find_spec("transformers") is not None:  # a stored plan is found by
        assert results[0]["key"]  # any process: its key is a digest, the same in both
    assert any(isinstance(v, str) for v in results[0].values())  # a refusal, named alike
    assert any(isinstance(v, list) and v[2] for v in results[0].values())  # blocks left whole


def _differing_ranks(rank: int, world: int) -> str:
    torch.manual_seed(0)
    model = build("gpt2-tiny", n_layer=1 + rank)  # rank 1 holds another model
    try:
        autotp.parallelize(model, world)
    except autotp.AutoTPError as e:
        return str(e)
    return "no error"


def test_parallelize_refuses_ranks_that_planned_differently() -> None:
    for message in run_on_gloo(_differing_ranks, 2):
        assert "ranks [1] differ from rank 0" in message


def test_fingerprint_depends_on_what_ranks_build() -> None:
    torch.manual_seed(0)
    model = build("gpt2-tiny")
    assert autotp.plan(model, 2).fingerprint == autotp.plan(model, 2).fingerprint
    assert autotp.plan(model, 2).fingerprint != autotp.plan(model, 4).fingerprint
