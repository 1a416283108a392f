"""Bad input is refused with an AutoTPError a user can act on, before anything is computed.

Each refusal names what is wrong, where (the fx node, the module path, the user's source
line) and what to do. Refusals of the model are checked on the meta device: a model with
no data cannot have been run, so the error came from graph work alone. And whatever autotp
is asked, the user's model is never modified.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import autotp
from autotp.models import bert, build, gpt2
from autotp.testing import run_on_gloo


def tiny(name: str, device: str = "cpu", **overrides: object) -> nn.Module:
    """A seeded reference model on `device` ("meta": no weights allocated)."""
    torch.manual_seed(0)
    with torch.device(device):
        return build(name, **overrides)


def inputs_for(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's example inputs, on its device (meta inputs for a meta model)."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in model.example_inputs().items()}


def refusal(fn, *args, **kwargs) -> str:
    """The message of the AutoTPError `fn(*args, **kwargs)` raises."""
    with pytest.raises(autotp.AutoTPError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def line_of(func, snippet: str) -> tuple[str, int]:
    """(file, line number) of the first line of `func`'s source containing `snippet`."""
    lines, start = inspect.getsourcelines(func)
    for i, text in enumerate(lines):
        if snippet in text:
            return inspect.getsourcefile(func), start + i
    raise LookupError(f"{snippet!r} not in {func.__qualname__}")


def names_source(message: str, path: str, line: int) -> bool:
    """Whether `message` points at `path` line `line`, in either spelling autotp uses
    ('file:12: code' or 'file, line 12, in fn: code')."""
    return re.search(re.escape(str(path)) + rf"(:|, line ){line}\b", message) is not None


def field(message: str, name: str) -> str:
    """The value of one '  name: value' line of a node refusal."""
    m = re.search(rf"^\s+{name}:\s+(.*)$", message, flags=re.MULTILINE)
    assert m, f"no {name!r} line in:\n{message}"
    return m.group(1)


# -- the model does not divide ------------------------------------------------------------

HEADS = {  # a hidden size divisible by tp=4 but a head count (6) that is not
    "gpt2": ("gpt2-tiny", dict(n_head=6, n_embd=48), "transformer.h.0.attn"),
    "bert": (
        "bert-tiny",
        dict(num_attention_heads=6, hidden_size=48),
        "bert.encoder.layer.0.attention.self",
    ),
}
# The first head view each attention's forward executes: the one propagation refuses.
HEAD_VIEWS = {
    "gpt2": (gpt2.CausalSelfAttention.forward, "k = k.view("),
    "bert": (bert.BertSelfAttention.forward, "q = self.query(x).view("),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("family", sorted(HEADS))
def test_heads_not_divisible_by_tp(family: str, device: str) -> None:
    name, overrides, module = HEADS[family]
    model = tiny(name, device, **overrides)
    msg = refusal(autotp.plan, model, 4, inputs_for(model), strict=True)
    assert "reshape from [2, 8, 48] to [2, 8, 6, 8]" in msg  # both shapes
    assert "split 4 ways" in msg  # the divisor
    assert "call_method[target=view]" in field(msg, "node")
    assert field(msg, "module") == module
    path, line = line_of(*HEAD_VIEWS[family])
    assert names_source(field(msg, "source"), path, line), msg
    assert "the split would land on a dimension of size 6" in msg  # the head count
    assert "number of heads" in field(msg, "hint")
    # without strict the attention blocks stay replicated, each listed, and the MLPs split
    plan = autotp.plan(model, 4, inputs_for(model))
    left = [m.rule.name for m, _ in plan.replicated]
    assert left and all(name.startswith("attention") for name in left)
    assert not any(m.rule.name.startswith("attention") for m in plan.matches)
    assert all("split 4 ways" in why for _, why in plan.replicated)
    assert any(m.rule.name == "mlp" for m in plan.matches)


def test_mlp_width_not_divisible_by_tp() -> None:
    model = tiny("bert-tiny", "meta", intermediate_size=50)  # heads 4 divide tp=4; 50 does not
    msg = refusal(autotp.plan, model, 4, inputs_for(model), strict=True)
    assert "bert.encoder.layer.0.intermediate.dense.weight has 50 output features" in msg
    assert "not divisible by tp=4" in msg
    assert field(msg, "module") == "bert.encoder.layer.0.intermediate.dense"
    path, line = line_of(bert.BertIntermediate.forward, "self.dense(x)")
    assert names_source(field(msg, "source"), path, line), msg
    assert "choose tp dividing the layer's width" in field(msg, "hint")


def test_a_divisible_odd_tp_is_accepted() -> None:
    """The refusals are about divisibility, not about tp being a power of two."""
    model = tiny("gpt2-tiny", "meta", n_head=3, n_embd=36)
    names = [m.rule.name for m in autotp.plan(model, 3, inputs_for(model)).matches]
    assert names.count("attention_fused_qkv") == names.count("mlp") == 2


# -- tp itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [autotp.plan, autotp.simulate, autotp.parallelize])
@pytest.mark.parametrize("tp", [0, -1, 1.5, True, "2", None])
def test_tp_must_be_a_positive_int(entry, tp: object) -> None:
    model = tiny("gpt2-tiny", "meta")
    msg = refusal(entry, model, tp, inputs_for(model))
    assert msg.startswith("tp must be an integer >= 1")
    assert repr(tp) in msg


# -- the forward cannot be traced ---------------------------------------------------------


class DataDependent(nn.Module):
    """Branches on a tensor's value: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if x.sum() > 0:
            h = h * 2
        return self.proj(torch.relu(h))


def test_data_dependent_control_flow_names_the_if() -> None:
    msg = refusal(autotp.plan, DataDependent(), 2, (torch.randn(2, 3, 8),))
    path, line = line_of(DataDependent.forward, "if x.sum() > 0:")
    assert path == __file__
    assert msg.startswith("cannot trace DataDependent")
    assert names_source(field(msg, "source"), path, line), msg
    assert field(msg, "source").endswith("if x.sum() > 0:")
    assert "control flow" in field(msg, "hint")


# -- a split value reaches an op that needs the whole dimension ---------------------------


class SoftmaxMLP(nn.Module):
    """The MLP rule's shape (softmax is glue), but softmax over the features c_fc splits."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(8, 16)
        self.c_proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = h.softmax(dim=-1)
        return self.c_proj(h)


class CumsumBranch(nn.Module):
    """A matched MLP whose split hidden value also feeds cumsum, an op with no rule."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(8, 16)
        self.c_proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        y = self.c_proj(torch.relu(h))
        return y + torch.cumsum(h, dim=-1).sum(-1, keepdim=True)


def test_softmax_over_the_split_dimension_is_refused() -> None:
    msg = refusal(autotp.plan, SoftmaxMLP(), 2, (torch.randn(2, 3, 8),))
    assert msg.startswith("softmax over the split dimension 2")
    assert "call_method[target=softmax]" in field(msg, "node")
    assert field(msg, "module") == "<root>"
    assert names_source(field(msg, "source"), *line_of(SoftmaxMLP.forward, "h.softmax(dim=-1)"))
    assert "needs the whole dimension" in field(msg, "hint")
    assert "no propagation rule" in field(msg, "hint")


def test_split_value_reaching_an_op_without_a_rule_is_refused() -> None:
    msg = refusal(autotp.plan, CumsumBranch(), 2, (torch.randn(2, 3, 8),))
    assert msg.startswith("a split value reaches 'cumsum', which has no sharding propagation rule")
    assert "target=torch.cumsum" in field(msg, "node")
    assert names_source(field(msg, "source"), *line_of(CumsumBranch.forward, "torch.cumsum("))
    assert "keep this op outside split blocks" in field(msg, "hint")


def test_the_mlp_without_the_softmax_is_accepted() -> None:
    """Control for the two refusals above: the same layers with an elementwise op split."""

    class MLP(SoftmaxMLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(torch.relu(self.c_fc(x)))

    p = autotp.plan(MLP(), 2, (torch.randn(2, 3, 8),))
    assert [m.rule.name for m in p.matches] == ["mlp"]


# -- process groups -----------------------------------------------------------------------


def test_parallelize_without_a_process_group() -> None:
    assert not dist.is_initialized()
    model = tiny("gpt2-tiny", "meta")
    msg = refusal(autotp.parallelize, model, 2, inputs_for(model))
    assert "init_process_group" in msg
    assert "autotp.simulate" in msg


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_parallelize_tp1_needs_no_group_and_is_the_model(name: str) -> None:
    assert not dist.is_initialized()
    model = tiny(name).double()
    x = model.example_inputs()
    par = autotp.parallelize(model, 1, x)
    for got, want in zip(par(**x), model(**x), strict=True):
        assert torch.equal(got, want)
    state = autotp.full_state_dict(par)
    for key, t in model.state_dict().items():
        assert torch.equal(state[key], t), key


def _parallelize_tp4(rank: int, world: int) -> str | None:
    """On a gloo rank: the message parallelize(tp=4) refuses with, or None."""
    model = tiny("gpt2-tiny")
    try:
        autotp.parallelize(model, 4, model.example_inputs())
    except autotp.AutoTPError as e:
        return str(e)
    return None


def test_parallelize_with_a_group_of_the_wrong_size() -> None:
    for msg in run_on_gloo(_parallelize_tp4, 2):
        assert msg is not None, "parallelize(tp=4) on 2 ranks was not refused"
        assert "the process group has 2 ranks but tp=4" in msg
        assert "tp=2" in msg  # what to do


# -- example inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "why"),
    [
        ({"idx": torch.zeros(2, 8, dtype=torch.long), "nonsense": 1}, "keyword"),
        ((torch.zeros(2, 8, dtype=torch.long), None, 3), "too many positional"),
    ],
)
def test_example_inputs_that_do_not_fit_forward(inputs: object, why: str) -> None:
    msg = refusal(autotp.plan, tiny("gpt2-tiny", "meta"), 2, inputs)
    assert msg.startswith("the example inputs do not fit GPT2.forward(")
    assert why in msg


def test_example_inputs_forward_rejects() -> None:
    msg = refusal(autotp.plan, tiny("gpt2-tiny"), 2, (torch.randn(2, 8),))  # float ids
    assert msg.startswith("running the traced GPT2 on the example inputs failed")
    assert "check that the example inputs (idx [2, 8] float32) are what forward expects" in msg
    assert "source: " in msg and "tests/test_" not in msg.split("source: ")[1].split("\n")[0]


def test_no_example_inputs_and_no_example_inputs_method() -> None:
    msg = refusal(autotp.plan, SoftmaxMLP(), 2)
    assert "autotp needs example inputs to trace SoftmaxMLP" in msg
    assert "example_inputs()" in msg


# -- what stays replicated is said ----------------------------------------------------------


class Classifier(nn.Module):
    """One linear and a tanh: no rule's structure, so the linear stays replicated."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).tanh()


def test_unmatched_linear_is_listed() -> None:
    p = autotp.plan(Classifier(), 2, (torch.randn(2, 8),))
    assert [li.weight for li in p.unmatched] == ["proj.weight"]
    assert p.splits == {}
    assert "proj.weight" in str(p)


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_every_linear_is_split_or_listed(name: str) -> None:
    """Nothing is left replicated silently: each linear's weight is split or in unmatched,
    and each unmatched one is in the printed plan."""
    p = autotp.plan(tiny(name, "meta"), 2, inputs_for(tiny(name, "meta")))
    unmatched = {li.weight for li in p.unmatched}
    for li in p.linears.values():
        assert (li.weight in p.splits) != (li.weight in unmatched), li.weight
    text = str(p)
    for weight in unmatched:
        assert weight in text


# -- the user's model is never modified ---------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "params": {k: p for k, p in model.named_parameters(remove_duplicate=False)},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modules": {k: type(m) for k, m in model.named_modules()},
        "training": {k: m.training for k, m in model.named_modules()},
        "attrs": set(vars(model)),
    }


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_the_model_is_never_modified(name: str) -> None:
    model = tiny(name).double()
    x = model.example_inputs()
    before = _snapshot(model)
    reference = copy.deepcopy(model)

    autotp.plan(model, 2, x)
    for module in (autotp.simulate(model, 2, x), autotp.parallelize(model, 1, x)):
        _logits, loss = module(**x)
        loss.backward()

    after = _snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, t in before["tensors"].items():
        assert torch.equal(after["tensors"][key], t), key
    for key, b in before["buffers"].items():
        assert torch.equal(after["buffers"][key], b), key
    assert after["params"].keys() == before["params"].keys()
    for key, p in before["params"].items():
        assert after["params"][key] is p, key  # the same Parameter objects
    for key in ("requires_grad", "modules", "training", "attrs"):
        assert after[key] == before[key], key
    assert [k for k, p in model.named_parameters() if p.grad is not None] == []
    # and it still computes what it did
    for got, want in zip(model(**x), reference(**x), strict=True):
        assert torch.equal(got, want)


# -- both front-ends, and weights that are not there ----------------------------------------


def test_control_flow_names_both_front_ends() -> None:
    """fx fails on the `if`, torch.export is tried next and fails too: both are named."""
    msg = refusal(autotp.plan, DataDependent(), 2, (torch.randn(2, 3, 8),))
    assert "with either front-end" in msg
    assert "torch.fx:" in msg and "torch.export:" in msg
    assert msg.index("torch.fx:") < msg.index("torch.export:")


def test_each_front_end_can_be_chosen() -> None:
    model = tiny("gpt2-tiny")
    assert autotp.plan(model, 2, frontend="fx").traced.frontend == "fx"
    assert autotp.plan(model, 2, frontend="export").traced.frontend == "export"
    msg = refusal(autotp.plan, DataDependent(), 2, (torch.randn(2, 3, 8),), frontend="fx")
    assert "torch.export" not in msg
    assert "frontend must be one of" in refusal(autotp.plan, model, 2, frontend="jit")


def test_parallelize_refuses_a_meta_model() -> None:
    """A model on the meta device has no weights to cut: planning works, parallelize says
    what to do instead."""
    model = tiny("gpt2-tiny", "meta")
    autotp.plan(model, 2, inputs_for(model))  # fine
    msg = refusal(autotp.parallelize, model, 1, inputs_for(model))
    assert "on the meta device" in msg and "to_empty" in msg and "autotp.plan" in msg


def test_a_refusal_carries_its_parts_as_fields_the_views_read() -> None:
    """What, where (node, module, source, rule) and the hint are fields of the error; the
    terminal view draws them without parsing the message."""
    from autotp.show.render import error_view, to_text

    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj = nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(x))
            return self.proj(h) + h.data[..., :8]

    with pytest.raises(autotp.AutoTPError) as info:
        autotp.plan(Leaky(), 2, (torch.randn(2, 3, 8),), strict=True)
    e = info.value
    assert "attribute .data" in e.what and e.hint and e.node is not None
    assert set(e.where) == {"node", "module", "source"}  # and "rule" at a split layer
    assert "test_errors.py" in e.where["source"]
    shown = to_text(error_view(e), width=200)
    assert e.what in shown and e.hint in shown and e.where["source"] in shown


def test_every_hint_is_data_and_the_text_ends_with_it() -> None:
    """No message in the library spells a hint into its text: each is passed as `hint=`
    (a field the views read, pickled with the error), and str() adds it last, once (only
    errors.py writes the hint line, and render.py its label)."""
    import ast
    import pickle
    from pathlib import Path

    from autotp.common.errors import UsageError
    from autotp.show.render import error_view, to_text

    root = Path(autotp.__file__).parent
    spelled = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if "  hint:" in node.value and path.name not in ("errors.py", "render.py"):
                    spelled.append(f"{path.relative_to(root)}:{node.lineno}")
    assert spelled == []
    e = UsageError("--tp 3 cannot split this model\nits heads: 4", hint="use --tp 2")
    assert str(e).endswith("\n  hint:   use --tp 2") and str(e).count("hint:") == 1
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is UsageError and back.hint == e.hint and str(back) == str(e)
    shown = to_text(error_view(back), width=200)
    assert "hint: use --tp 2" in shown and "its heads: 4" in shown and shown.count("hint") == 1


def test_an_error_quoting_another_keeps_its_first_line_even_when_it_has_none() -> None:
    """Every error that quotes another (an export failure, a fuzz verdict, a checkpoint
    problem) keeps the first line of its text through one helper; an exception with no
    text gives "", not an IndexError in the middle of reporting."""
    from autotp.common.errors import first_line

    assert first_line(RuntimeError("shape mismatch\n  at line 3")) == "shape mismatch"
    assert first_line(AssertionError()) == ""
    assert first_line("") == ""
    from pathlib import Path

    root = Path(autotp.__file__).parent
    quoting = [str(f.relative_to(root)) for f in root.rglob("*.py")
               if "splitlines()[0]" in f.read_text()]  # fmt: skip
    assert quoting == [], "use common.errors.first_line"
