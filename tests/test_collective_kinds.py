"""Each kind of collective site is declared once (autotp.runtime.collective_kinds); every place
that builds, simulates, counts or shows sites handles every kind it declares."""

from __future__ import annotations

import torch.nn as nn

from autotp.build import simulate
from autotp.rewrite import sites
from autotp.runtime import collective_kinds as kinds
from autotp.runtime.comm import LocalComm
from autotp.show import report


def test_every_consumer_handles_every_declared_kind() -> None:
    made = kinds.site_modules(LocalComm())
    assert set(made) == {k.module for k in kinds.KINDS} == set(sites.COLLECTIVE_MODULES)
    for k in kinds.KINDS:
        assert isinstance(made[k.module](), nn.Module), k.module  # materialise builds it
        assert k.module in simulate._SIMULATED or k is kinds.F_PARAMS  # simulate runs it
        assert callable(k.simulated)
        for name in k.names:  # counted by plans, sized by the report, shown in the summary
            assert name in kinds.NAMES and kinds.RUNS[name] == k.runs
            assert name in kinds.SHOWN
        for run in k.runs:  # named by the views
            assert (run.op, run.direction) in kinds.RUN_TEXT
    assert len({k.module for k in kinds.KINDS}) == len(kinds.KINDS)  # one declaration per module
    assert report.RUNS is kinds.RUNS  # the report sizes what the table says
    assert set(kinds.SHOWN) == set(kinds.NAMES)  # the one-line summary names every count


def test_a_site_module_name_tells_its_kind() -> None:
    for k in kinds.KINDS:
        assert sites.site_kind(f"{k.module}.a_node") == k.module
