"""Real third-party models through autotp: for each model and tp, the front-end used, the
largest float64 difference against serial (outputs, loss, gradients, one SGD step), the
collectives one training step ran, and the time `parallelize` (plan + shards) took.

    python bench/hf_table.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import autotp
from autotp.testing import assert_equivalent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import build, inputs  # noqa: E402


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in ("gpt2", "bert", "bert-mlm", "llama"):
        for tp in (2, 4):
            model = build(name, heads=8, kv_heads=4 if name == "llama" else None).double()
            x = inputs(name)
            t = time.perf_counter()
            autotp.plan(model, tp, x)  # trace (export), match, propagate, rewrite
            t_par = time.perf_counter() - t
            t = time.perf_counter()
            sim = autotp.simulate(model, tp, x)
            t_sim = time.perf_counter() - t
            with autotp.count_collectives() as log:
                out = sim(**x)
                loss = out.loss if getattr(out, "loss", None) is not None else None
                if loss is None:
                    loss = out.last_hidden_state.square().mean()
                loss.backward()
            report = assert_equivalent(model, x, tp, atol=1.0)  # report, don't judge here
            kinds = {k: log.count(None, k) for k in ("all_reduce", "all_reduce_max", "all_gather")}
            rows.append((name, tp, sim.plan.traced.frontend, report, kinds, t_par, t_sim))
    print(f"{'model':10s} {'tp':>3s} {'front-end':9s} {'out':>9s} {'loss':>9s} {'grad':>9s} "
          f"{'step':>9s}  collectives/step (sum, max, gather)       plan  simulate")  # fmt: skip
    for name, tp, fe, rep, k, tpar, tsim in rows:
        d = [rep.largest(p + ":") for p in ("output", "loss", "grad", "step")]
        print(f"{name:10s} {tp:3d} {fe:9s} " + " ".join(f"{v:9.2g}" for v in d)
              + f"  {k['all_reduce']:3d} {k['all_reduce_max']:3d} {k['all_gather']:3d}"
              + f"{'':22s}{tpar:6.2f} s  {tsim:6.2f} s")  # fmt: skip
    print("2 layers, 8 heads of 8 (Llama: 4 KV heads), vocab 101 padded to 128 x tp; float64.")
    print("GPT-2's and Llama's loss is float32 inside the model (logits.float()), in serial too.")


if __name__ == "__main__":
    main()
