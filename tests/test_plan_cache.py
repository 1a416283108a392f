"""A region plan stored on disk is used only for the same program, and is the plan that
planning makes: same fingerprint, equal to serial, its later call patterns kept too. (That
every process computes one key whatever its hash seed: test_determinism.py.)"""

from __future__ import annotations

import pytest
import torch
from hf_models import RTOL_FLOAT32_INSIDE, build, inputs, transformers

import autotp
from autotp.capture.trace import bind_inputs
from autotp.planning import cache as plan_cache
from autotp.planning.plan import rules_or_default
from autotp.regions import form
from autotp.testing import assert_equivalent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTP_PLAN_CACHE", str(tmp_path))
    return tmp_path


def _no_tracing(monkeypatch):
    """Planning anything from here on fails the test."""

    def traced(*a, **k):
        raise AssertionError("planned again")

    monkeypatch.setattr(form, "_calls", traced)
    monkeypatch.setattr(form._Patterns, "_plan", traced)


def _key(model, tp=2, example=None, rules=None):
    given = bind_inputs(model, example)
    given.setdefault("use_cache", False)
    return plan_cache.program_key(model, tp, given, rules or rules_or_default(None), False, False)


def test_a_stored_plan_is_the_plan_made_and_equals_serial(cache, monkeypatch):
    model = build("llama", kv_heads=2).double().eval()
    made = autotp.plan(model, 2)
    assert len(list(cache.glob("*.plan"))) == 1
    _no_tracing(monkeypatch)
    stored = autotp.plan(model, 2)
    assert stored is not made
    assert stored.fingerprint == made.fingerprint
    assert str(stored) == str(made)
    assert_equivalent(model, inputs("llama"), 2, atol=1e-10, rtol=RTOL_FLOAT32_INSIDE["llama"],
                      parallel=lambda m, t, x: autotp.simulate(m, stored))  # fmt: skip


def test_a_stored_plan_keeps_a_narrowed_split_and_plans_new_patterns_like_it(cache):
    """At tp=4 with 2 key/value heads the attention rule narrows to its fallback (K and V
    slices held by 2 ranks each): the stored plan keeps that split, so a later call
    pattern (decoding with the cache) planned like it is proven and equals serial."""
    model = build("llama", kv_heads=2).double().eval()
    made = autotp.plan(model, 4)
    stored = autotp.plan(model, 4)  # read back from the file
    assert stored is not made and stored.fingerprint == made.fingerprint

    def splits(plan):
        return [(m.rule.name, m.rule.split) for r in plan.regions for m in r.plan.matches]

    assert splits(stored) == splits(made)
    assert any(getattr(s, "replicas", 1) > 1 for _, split in splits(stored) for s in split.values())
    ids = inputs("llama")["input_ids"]
    serial = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    parallel = autotp.simulate(model, stored).generate(ids, max_new_tokens=3, do_sample=False,
                                                       pad_token_id=0)  # fmt: skip
    assert torch.equal(parallel, serial)


def test_a_stored_plan_is_used_only_for_the_same_program(cache):
    model = build("gpt2").eval()
    key = _key(model)
    assert key is not None and key == _key(build("gpt2", seed=1).eval())  # values: not read
    other = build("gpt2").eval()
    other.config.layer_norm_epsilon = 1e-6  # a number the layers read
    changed = [
        _key(build("gpt2", layers=3).eval()),  # another structure
        _key(other),
        _key(model, tp=4),
        _key(model, example=inputs("gpt2", seq=6)),  # another example call
        _key(build("gpt2").eval().to(torch.float64)),  # other dtypes
        _key(build("gpt2").train()),  # another mode
    ]
    assert None not in changed and key not in changed and len(set(changed)) == len(changed)
    # another class with another forward, written in this file
    edited = build("llama").eval()
    mlp = edited.model.layers[0].mlp
    mlp.__class__ = type("EditedMLP", (type(mlp),), {"forward": lambda self, x: 2 * x})
    assert _key(edited) not in (None, _key(build("llama").eval()))


def test_a_forward_or_function_patched_at_run_time_is_another_program(cache, monkeypatch):
    """As kernel libraries patch transformers: no file changes, the program does."""
    from transformers.models.gpt2 import modeling_gpt2

    model = build("gpt2").eval()
    key = _key(model)
    with monkeypatch.context() as patch:
        patch.setattr(modeling_gpt2.GPT2MLP, "forward", lambda self, x: x)
        patched_forward = _key(model)
    with monkeypatch.context() as patch:
        patch.setattr(modeling_gpt2, "eager_attention_forward", lambda *a, **k: None)
        patched_function = _key(model)
    assert _key(model) == key
    assert None not in (key, patched_forward, patched_function)
    assert len({key, patched_forward, patched_function}) == 3


def test_what_the_key_cannot_hold_is_never_cached(cache):
    hooked = build("gpt2").eval()
    hooked.transformer.h[0].register_forward_hook(lambda *a: None)
    assert _key(hooked) is None  # a hook's closure is no value the key can read
    assert _key(build("gpt2").eval(), rules=rules_or_default(None)[:-1]) is None  # own rules
    autotp.plan(hooked, 2)
    assert not list(cache.glob("*.plan"))


def test_calls_planned_later_are_stored_with_the_plan(cache, monkeypatch):
    model = build("llama", kv_heads=2).double().eval()
    model.config.use_cache = True
    ids = inputs("llama")["input_ids"]
    serial = model.generate(ids, max_new_tokens=3, do_sample=False)
    first = autotp.simulate(model, 2)
    assert torch.equal(first.generate(ids, max_new_tokens=3, do_sample=False), serial)
    _no_tracing(monkeypatch)  # the prompt and the decoded tokens: planned before
    again = autotp.simulate(model, 2)
    assert torch.equal(again.generate(ids, max_new_tokens=3, do_sample=False), serial)


def test_caching_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOTP_PLAN_CACHE", "off")
    assert plan_cache.directory() is None
    autotp.plan(build("gpt2").eval(), 2)
    monkeypatch.delenv("AUTOTP_PLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert plan_cache.directory() == tmp_path / "autotp" / "plans"
    assert transformers is not None
