"""`autotp show`: golden views of tiny models, every collective visible, and the command
run as a user types it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import autotp
from autotp.models import build
from autotp.rewrite.sites import record
from autotp.run import cli
from autotp.show import render

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("AUTOTP_UPDATE_GOLDEN") == "1"


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        path.write_text(text + "\n")
    assert text + "\n" == path.read_text(), f"{name} changed; AUTOTP_UPDATE_GOLDEN=1 to accept"


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_golden_summary(name: str) -> None:
    plan = autotp.plan(build(name), 2)
    _golden(f"{name}-tp2.txt", render.to_text(render.summary(plan), width=100))


def test_golden_graph_of_one_layer() -> None:
    plan = autotp.plan(build("gpt2-tiny"), 2)
    _golden("gpt2-tiny-tp2-graph-layer0.txt", render.to_text(render.graph_view(plan, 0), 140))


def _collective_nodes(plan) -> list[str]:
    return [n.name for n in plan.graph.nodes if record(n).collective]


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny", "bert-tiny-preln"])
def test_every_collective_appears(name: str) -> None:
    plan = autotp.plan(build(name), 4)
    nodes = _collective_nodes(plan)
    graph = render.to_text(render.graph_view(plan), width=400)
    for node in nodes:
        assert re.search(rf"\b{node}\b", graph), node
    assert graph.count("◆") == len(nodes)
    tree = render.to_text(render.module_tree(plan), width=200)
    folded = 0  # layers folded as "same as 0" carry their count
    for line in tree.splitlines():
        m = re.search(r"(\d+) more, same as .*◆ (\d+) collectives each", line)
        m1 = re.search(r": same as .*◆ (\d+) collectives each", line)
        if m:
            folded += int(m.group(1)) * int(m.group(2)) - 1
        elif m1:
            folded += int(m1.group(1)) - 1
    assert tree.count("◆") + folded == len(nodes)  # the summary marks each where it runs


def _autotp(*args: str) -> subprocess.CompletedProcess:
    """The command, run in this process (importing torch per call would cost seconds)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _autotp_process(*args: str) -> subprocess.CompletedProcess:
    """The command as a user types it: `python -m autotp ...` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "autotp", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_show_summary_and_views(tmp_path: Path) -> None:
    out = _autotp("show", "gpt2-tiny", "--tp", "2", "--width", "100")
    assert out.returncode == 0, out.stderr
    assert "attention_fused_qkv" in out.stdout and "parameters per rank" in out.stdout
    out = _autotp("show", "gpt2-tiny", "--tp", "2", "--diff", "--layer", "1", "--width", "200")
    assert out.returncode == 0 and "serial, layer 1" in out.stdout and "rank graph" in out.stdout
    out = _autotp("show", "bert-tiny", "--tp", "2", "--unmatched", "--width", "200")
    assert (
        "cls.predictions.transform.dense.weight" in out.stdout and "no rule matched" in out.stdout
    )
    out = _autotp("show", "bert-tiny", "--tp", "2", "--json")
    data = json.loads(out.stdout)
    assert data["tp"] == 2 and {m["rule"] for m in data["matches"]} >= {"mlp", "lm_head"}
    assert len(data["collectives"]) == 7 + 5 + 1 + 1
    svg = tmp_path / "view.svg"
    out = _autotp("show", "gpt2-tiny", "--tp", "4", "--svg", str(svg))
    assert out.returncode == 0 and svg.read_text().lstrip().startswith("<svg")


def test_cli_friendly_failures(tmp_path: Path) -> None:
    out = _autotp("show", "gpt-3")
    assert out.returncode == 2 and "unknown model 'gpt-3'" in out.stderr
    assert "megatron-8.3b" in out.stderr and "Traceback" not in out.stderr
    out = _autotp("show", "bert-tiny", "--tp", "3", "--width", "300")
    assert out.returncode == 0  # 4 heads, 32 wide: only the vocabulary splits at tp=3...
    assert "left replicated (no rule matched, or its split not proven)" in out.stdout
    assert "attention_separate_qkv matched, but its split could not be proven" in out.stdout
    out = _autotp("show", "bert-tiny", "--tp", "3", "--strict")  # ...and --strict refuses
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for line in ("node:", "module:", "source:", "hint:"):
        assert line in out.stderr
    factory = tmp_path / "mine.py"
    factory.write_text(
        "import torch, torch.nn as nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.a = nn.Linear(8, 16); self.b = nn.Linear(16, 8)\n"
        "    def forward(self, x):\n"
        "        return self.b(torch.relu(self.a(x)))\n"
        "    def example_inputs(self):\n"
        "        return (torch.randn(2, 8),)\n"
        "def make():\n"
        "    return M()\n"
    )
    out = _autotp("show", f"{factory}:make", "--tp", "2", "--width", "100")
    assert out.returncode == 0, out.stderr
    assert "mlp" in out.stdout


def test_cli_renders_a_named_model_on_meta() -> None:
    """As a user types it, in a new process (test_plan plans the 8.3B model on meta)."""
    out = _autotp_process("show", "gpt2", "--tp", "4", "--width", "120")
    assert out.returncode == 0, out.stderr
    assert "1 … 11: 11 more, same as 0 (◆ 4 collectives each)" in out.stdout
    assert "attention_fused_qkv │ 12" in out.stdout


_NO_EXAMPLE_INPUTS = """
import torch, torch.nn as nn
class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.a, self.b = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 16)
    def forward(self, idx):
        x = self.wte(idx)
        return x + self.b(torch.relu(self.a(x)))
class Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)
    def forward(self, x, scale=1.0):
        return self.b(torch.relu(self.a(x))) * scale
def tokens():
    return Tokens()
def features():
    return Features()
"""


def test_show_any_model_without_example_inputs(tmp_path: Path) -> None:
    """Token ids are made from the model's first embedding (--batch x --seq); other inputs
    are described on the command line, and the hints speak of command-line options."""
    path = tmp_path / "mine.py"
    path.write_text(_NO_EXAMPLE_INPUTS)
    out = _autotp("show", f"{path}:tokens", "--batch", "3", "--seq", "5", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["matches"][0]["rule"] == "mlp"
    out = _autotp("show", f"{path}:features", "--width", "200")
    assert out.returncode == 2 and "--input NAME=SHAPE:DTYPE" in out.stderr
    assert "example_inputs=(" not in out.stderr  # the Python API's words, not the CLI's
    out = _autotp("show", f"{path}:features", "--input", "x=2x8x16:float", "--json")
    assert out.returncode == 0, out.stderr
    out = _autotp("show", f"{path}:features", "--input", "y=2x8", "--width", "200")
    assert out.returncode == 2 and "its arguments are x, scale" in out.stderr
    out = _autotp("show", f"{path}:features", "--input", "x=2by8", "--width", "200")
    assert out.returncode == 2 and "e.g. --input idx=2x16:long" in out.stderr


_SIXTEEN_POSITIONS = """
import torch
import torch.nn as nn


class Short(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(50, 32)
        self.pos = nn.Parameter(torch.zeros(1, 16, 32))  # 16 positions
        self.fc, self.proj = nn.Linear(32, 128), nn.Linear(128, 32)

    def forward(self, idx):
        x = self.wte(idx) + self.pos[:, : idx.size(1)]
        return self.proj(torch.relu(self.fc(x)))


def build():
    return Short()
"""


def test_show_refuses_example_inputs_in_its_own_flags(tmp_path: Path) -> None:
    """The default --seq does not fit a model of 16 positions: one panel naming the node,
    the user's line and show's flags; no torch traceback or log line on the terminal."""
    path = tmp_path / "short.py"
    path.write_text(_SIXTEEN_POSITIONS)
    out = _autotp_process("show", f"{path}:build", "--tp", "2")
    assert out.returncode == 2
    text = out.stderr
    flat = "".join(text.replace("│", "").split())  # the panel unwrapped, without spaces
    for said in ("--batch 8 --seq 64", "--input NAME=SHAPE:DTYPE",
                 "short.py:14: x = self.wte(idx) + self.pos"):  # fmt: skip
        assert "".join(said.split()) in flat, said
    for noise in ("Traceback", "tlparse", "fake_tensor.py", "fx/proxy.py", "E1"):
        assert noise not in text, noise
    assert _autotp("show", f"{path}:build", "--tp", "2", "--seq", "16", "--json").returncode == 0
