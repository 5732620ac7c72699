"""benchmarks/truth_relu.py: the λ search to a target L0 and the equal-L0 read-out (pure functions, no training)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import truth_relu  # noqa: E402


def test_search_steps_out_until_bracketed_then_stays_inside():
    assert truth_relu.next_l1([(2.0, 40.0)], 5) == 8.0  # too dense, far: λ × 4
    assert truth_relu.next_l1([(2.0, 0.5)], 5) == 0.5  # too sparse, far: λ ÷ 4
    assert math.isclose(truth_relu.next_l1([(2.0, 6.0)], 5), 2.3)  # near the target: a small step
    lam = truth_relu.next_l1([(2.0, 20.0), (8.0, 1.0)], 5)
    assert 2.0 < lam < 8.0
    # the secant through (log 2, log 20) and (log 8, log 1) meets log 5 at λ = 2·4^(ln 4 / ln 20)
    assert math.isclose(lam, 2 * 4 ** (math.log(8 / 2) / math.log(20)), rel_tol=1e-9)


def test_read_out_at_target_interpolates_in_log_l0_and_names_the_nearest_run():
    runs = [{"l1": 1.0, "l0": 20.0, "mcc": 0.9, "mean_f1": 0.6, "absorption": None, "dead_frac": 0.1, "fvu": 0.3, "tokens_per_s": 10.0},
            {"l1": 4.0, "l0": 2.0, "mcc": 0.5, "mean_f1": 0.2, "absorption": None, "dead_frac": 0.5, "fvu": 0.9, "tokens_per_s": 30.0},
            {"l1": 2.0, "l0": 6.0, "mcc": 0.7, "mean_f1": 0.4, "absorption": None, "dead_frac": 0.3, "fvu": 0.6, "tokens_per_s": 20.0}]
    out = truth_relu.at_target(runs, 5.0)
    assert out["nearest"]["l1"] == 2.0 and out["nearest"]["l0"] == 6.0
    t = math.log(5 / 2) / math.log(6 / 2)  # between the runs at L0 2 and 6
    assert math.isclose(out["interpolated"]["mcc"], 0.5 + t * 0.2)
    assert out["interpolated"]["absorption"] is None  # no values: nothing interpolated
    assert truth_relu.at_target(runs[:1], 5.0)["interpolated"] is None  # no bracket: no extrapolation


def test_k_search_scales_k_by_the_l0_ratio_and_stops_between_adjacent_k():
    assert truth_relu.next_k([(5, 4.5)], 5) == 6  # under the target: round(5 · 5 / 4.5) = 6
    assert truth_relu.next_k([(5, 2.5)], 5) == 10  # far under: k doubled
    assert truth_relu.next_k([(5, 5.2)], 5) == 4  # rounding would keep k 5: one step down
    assert truth_relu.next_k([(10, 8.0), (12, 11.0)], 10) == 11  # inside the bracket
    assert truth_relu.next_k([(5, 4.5), (6, 5.4)], 5) is None  # adjacent k bracket it: nothing left to try
    assert truth_relu.next_k([(1, 1.5)], 1) is None  # k cannot go below 1
