"""Packaging: the repository's rules/ and models/ folders ship as autotp.rules and
autotp.models, and nothing generic named `rules` or `models` is installed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import autotp
import autotp.models
import autotp.rules
import autotp.testing

REPO = Path(__file__).resolve().parents[1]


def test_rules_and_models_come_from_the_repository_folders() -> None:
    """The editable install maps the subpackages onto the top-level folders."""
    assert Path(autotp.rules.__file__).resolve() == REPO / "rules" / "__init__.py"
    assert Path(autotp.models.__file__).resolve() == REPO / "models" / "__init__.py"
    assert Path(autotp.__file__).resolve() == REPO / "autotp" / "__init__.py"


def test_no_generic_top_level_packages_outside_the_repository(tmp_path: Path) -> None:
    """Away from the checkout (cwd elsewhere, no PYTHONPATH), autotp's subpackages import
    and `rules`/`models` do not: they are not installed under those names."""
    code = (
        "import importlib.util, autotp.rules, autotp.models\n"
        "print(importlib.util.find_spec('rules'), importlib.util.find_spec('models'))\n"
        "print(autotp.rules.__name__, autotp.models.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["None None", "autotp.rules autotp.models"]


def test_default_rules_include_the_three_megatron_rules_in_order() -> None:
    """Attention first (it claims its linears before the MLP rule could), then the MLP."""
    names = [rule.name for rule in autotp.rules.DEFAULT_RULES]
    megatron = ["attention_fused_qkv", "attention_separate_qkv", "mlp"]
    assert [n for n in names if n in megatron] == megatron


def test_one_rule_per_file() -> None:
    """Every default rule is the RULE of its own module in rules/."""
    files = sorted(p.stem for p in (REPO / "rules").glob("*.py") if p.stem != "__init__")
    owners = {}
    for stem in files:
        module = importlib.import_module(f"autotp.rules.{stem}")
        owners[id(module.RULE)] = stem
    assert len(owners) == len(files)
    for rule in autotp.rules.DEFAULT_RULES:
        assert id(rule) in owners, rule.name


def test_public_api() -> None:
    for name in (
        "plan",
        "parallelize",
        "simulate",
        "full_state_dict",
        "full_grads",
        "count_collectives",
        "AutoTPError",
    ):
        assert name in autotp.__all__, name
        assert hasattr(autotp, name), name
    assert issubclass(autotp.AutoTPError, Exception)
    for name in ("assert_equivalent", "tp_cases", "run_on_gloo"):
        assert callable(getattr(autotp.testing, name)), name


def test_every_package_folder_is_installed() -> None:
    """pyproject's package list names every folder with an __init__.py (a clean install
    ships only those), and rules/ and models/ under their autotp names."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "autotp").rglob("__init__.py")
    }
    assert listed == folders | {"autotp.rules", "autotp.models"}
