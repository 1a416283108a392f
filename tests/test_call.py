"""Every spelling of an op call becomes one record.

Property: module, function, method, keyword and aten spellings of the same call (as fx and
torch.export record them) give the same op name and the same canonical arguments, with
defaults filled in and dimensions made non-negative; shape arguments keep the path where
the rewrite edits them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.capture.trace import trace
from autotp.match.call import Call, canonical


class Spellings(nn.Module):
    """Each op spelled four ways; forward returns all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)
        self.emb = nn.Embedding(10, 8, padding_idx=3)
        self.ce = nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")

    def forward(self, x: torch.Tensor, ids: torch.Tensor, t: torch.Tensor):
        B, T, C = x.shape
        logits = x.reshape(B * T, C)
        return (
            self.softmax(x), F.softmax(x, -1), x.softmax(dim=2), torch.softmax(x, 2),
            x.view(B, T, 2, C // 2), x.view((B, T, 2, C // 2)), x.reshape(shape=(B, T, 2, 4)),
            torch.reshape(x, (B, T, 2, C // 2)),
            x.transpose(-1, 1), torch.transpose(x, 2, 1), x.permute(0, 2, -2),
            x.permute([0, 2, 1]),
            x.split(4, -1), torch.split(x, split_size_or_sections=4, dim=2), x.chunk(2, -1),
            self.emb(ids), F.embedding(ids, self.emb.weight, padding_idx=3),
            self.ce(logits, t), F.cross_entropy(logits, t, ignore_index=-1, reduction="sum"),
            x.mean(-1, keepdim=True), torch.mean(x, dim=[2], keepdim=True),
        )  # fmt: skip


def _calls(frontend: str) -> dict[str, list[Call]]:
    model = Spellings().double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ids = torch.randint(0, 10, (2, 3))
    t = torch.randint(0, 8, (6,))
    gm = trace(model, (x, ids, t), frontend=frontend).gm
    out: dict[str, list[Call]] = {}
    for n in gm.graph.nodes:
        if n.op.startswith("call"):
            call = canonical(n, gm)
            out.setdefault(call.op, []).append(call)
    return out


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_every_spelling_gives_one_record(frontend: str) -> None:
    calls = _calls(frontend)
    softmax = calls["softmax"]
    assert len(softmax) == 4 and {c["dim"] for c in softmax} == {2}
    views = [c for c in calls["view"] if len(c.node.meta["val"].shape) == 4]
    assert len(views) == 4
    for c in views:
        shape = c["shape"]
        assert len(shape) == 4
        for i, a in enumerate(shape):  # each size sits where the call's path says
            node_args = c.node.args if isinstance(c.path("shape", i)[0], int) else c.node.kwargs
            got = node_args[c.path("shape", i)[0]]
            for k in c.path("shape", i)[1:]:
                got = got[k]
            assert got is a
    assert sorted((c["dim0"], c["dim1"]) for c in calls["transpose"]) == [(2, 1), (2, 1)]
    assert [list(c["dims"]) for c in calls["permute"]] == [[0, 2, 1]] * 2
    assert {c["dim"] for c in calls["split"] + calls["chunk"]} == {2}
    assert all(c["split_size"] in (4, [4, 4]) for c in calls["split"])
    emb = calls["embedding"]
    assert len(emb) == 2 and all(c["padding_idx"] == 3 for c in emb)
    assert all(c["max_norm"] is None and not c["sparse"] for c in emb)
    ce = calls["cross_entropy"]
    assert len(ce) == 2
    assert {(c["ignore_index"], c["reduction"], c["label_smoothing"]) for c in ce} == {
        (-1, "sum", 0.0)
    }
    means = calls["mean"]
    assert len(means) == 2
    assert all(c["dim"] in (2, [2]) for c in means)
    assert all(c["keepdim"] for c in means)
