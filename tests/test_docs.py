"""The README and the pages under docs/ cannot drift from the code: every Python block of
a page runs, in order, in one namespace per page (in a fresh folder); a block marked
```python torchrun=N runs on N local gloo processes, as `torchrun --nproc-per-node N`
would run it, each starting from what the page's blocks before it made. Every command
line of a page names an `autotp` subcommand and flags that its `--help` lists, or a bench
script holding the flags it is given. Blocks marked ```text are output, not code."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autotp.testing import run_on_gloo

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\S*)\s*(.*)$")


@dataclass(frozen=True)
class Block:
    lang: str
    options: dict[str, str]
    code: str
    where: str  # page:line, for tracebacks


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        options = dict(o.split("=", 1) for o in m.group(2).split() if "=" in o)
        rel = page.relative_to(ROOT)
        out.append(Block(m.group(1), options, "\n".join(body) + "\n", f"{rel}:{start + 1}"))
        i += 1
    return out


def _uses(page: Path, word: str) -> bool:
    return any(word in b.code for b in blocks(page) if b.lang == "python")


def _page_param(page: Path) -> Any:
    marks = []
    if _uses(page, "transformers"):
        marks.append(pytest.mark.hf)
    if any("torchrun" in b.options for b in blocks(page)):
        marks.append(pytest.mark.gloo)
    return pytest.param(page, id=str(page.relative_to(ROOT)), marks=marks)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
def test_every_python_block_of_a_page_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's Python, as a reader pastes it block by block."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    ran = 0
    for block in blocks(page):
        if block.lang != "python":
            continue
        ranks = int(block.options.get("torchrun", 0))
        if ranks:
            _on_ranks(block, namespace, ranks)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran == sum(b.lang == "python" for b in blocks(page))


def _on_ranks(block: Block, namespace: dict[str, Any], world: int) -> None:
    """`block` on `world` forked gloo processes with torchrun's environment, each from
    the page's namespace so far."""

    def rank(r: int, w: int) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block.code, block.where, "exec"), dict(namespace))  # noqa: S102

    run_on_gloo(rank, world, torchrun=True)


def _commands(block: Block) -> list[list[str]]:
    """A shell block's commands, continuation lines joined, comments dropped."""
    text = block.code.replace("\\\n", " ")
    return [argv for line in text.splitlines() if (argv := shlex.split(line, comments=True))]


_HELP: dict[str, str] = {}


def _help(sub: str) -> str:
    if sub not in _HELP:
        from autotp.run.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([sub, "--help"])
        _HELP[sub] = out.getvalue()
    return _HELP[sub]


def test_every_command_line_of_the_pages_is_one_the_tools_take() -> None:
    """`autotp SUB --flag ...` lines: SUB exists and its --help lists each flag; `python
    bench/x.py --flag` lines: the script exists and reads each flag. pip and pytest lines
    are the set-up, which CI itself runs."""
    checked = 0
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in ("", "bash", "sh", "console"):
                continue
            for argv in _commands(block):
                flags = [a.split("=")[0] for a in argv if a.startswith("--")]
                if argv[0] == "autotp":
                    text = _help(argv[1])
                    assert text, f"{block.where}: autotp has no subcommand {argv[1]!r}"
                    missing = [f for f in flags if f not in text]
                    assert not missing, f"{block.where}: `autotp {argv[1]}` takes no {missing}"
                elif argv[0] == "python" and argv[1].startswith("bench/"):
                    source = (ROOT / argv[1]).read_text()
                    missing = [f for f in flags if f not in source]
                    assert not missing, f"{block.where}: {argv[1]} reads no {missing}"
                else:
                    assert argv[0] in ("pip", "pytest"), f"{block.where}: {shlex.join(argv)}"
                    continue
                checked += 1
    assert checked >= 20
