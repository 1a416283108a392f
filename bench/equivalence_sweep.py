"""The largest float64 difference between simulate and serial over many hypothesis-drawn
configurations (outputs, loss, gradients, weights after one SGD step).

    python bench/equivalence_sweep.py --examples 200
"""

from __future__ import annotations

import argparse
import time

from hypothesis import HealthCheck, given, settings

from autotp.testing import assert_equivalent, tp_cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    args = ap.parse_args()
    worst: dict[str, tuple[float, str]] = {}
    count = [0]

    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=tp_cases())
    def sweep(case) -> None:
        model = case.build()
        report = assert_equivalent(model, case.inputs(model), case.tp, atol=1e-10)
        count[0] += 1
        for kind in ("output", "loss", "grad", "step"):
            d = report.largest(kind + ":")
            if d >= worst.get(kind, (-1.0, ""))[0]:
                worst[kind] = (d, f"{case.name} tp={case.tp} {case.overrides}")

    t = time.perf_counter()
    sweep()
    print(f"{count[0]} configurations in {time.perf_counter() - t:.1f} s, float64")
    for kind, (d, where) in worst.items():
        print(f"  largest {kind:6s} difference {d:.3g}  ({where})")


if __name__ == "__main__":
    main()
