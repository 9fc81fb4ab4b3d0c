"""orchestration/stats.py: paired differences, t intervals and their wording, checked against hand values."""

from __future__ import annotations

import math

import pytest

from orchestration import stats


def test_paired_by_seed_with_a_t_interval():
    # diffs 3, 2, 4 over seeds 0-2: mean 3, sd 1, t(0.975, 2) = 4.302653: half width 4.302653 / sqrt(3) = 2.484138
    p = stats.paired({0: 53.0, 1: 52.0, 2: 54.0, 9: 1.0}, {0: 50.0, 1: 50.0, 2: 50.0})
    assert p["n"] == 3 and p["keys"] == [0, 1, 2] and p["mean"] == pytest.approx(3.0)
    assert (p["lo"], p["hi"]) == (pytest.approx(3 - 2.484138, abs=1e-6), pytest.approx(3 + 2.484138, abs=1e-6))
    assert p["excludes_zero"] is True and stats.verdict(p) == "excludes 0"
    assert stats.fmt_paired(p) == "+3.00 [+0.52, +5.48] *"


def test_pairs_by_split_and_seed_and_includes_zero():
    a = {("30", 0): 1.0, ("30", 1): -1.0, ("50", 0): 2.0}
    p = stats.paired(a, {k: 0.0 for k in a})
    assert p["n"] == 3 and p["excludes_zero"] is False and stats.fmt_paired(p).endswith("]")
    assert stats.verdict(p) == "includes 0"


def test_one_pair_has_no_interval_and_none_is_a_dash():
    one = stats.paired({0: 51.2}, {0: 50.0, 1: 49.0})
    assert one["n"] == 1 and one["lo"] is None and one["excludes_zero"] is None
    assert stats.fmt_paired(one) == "+1.20 (n = 1, no interval)" and stats.verdict(one) == "n = 1, no interval"
    none = stats.paired({0: 1.0}, {1: 2.0})
    assert none["n"] == 0 and math.isnan(none["mean"]) and stats.fmt_paired(none) == "—"


def test_mean_std_and_bad_input():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert math.isnan(stats.mean_std([5.0])[1]) and math.isnan(stats.mean_std([])[0])
    with pytest.raises(ValueError, match="level=1.5"):
        stats.paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0}, level=1.5)
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        stats.t_half_width([1.0])


def test_seed_scores_and_the_sweep_summary_pairs_multi_seed_trials_with_the_best():
    from orchestration.results import noise_marks, paired_marks

    assert stats.seed_scores({"seed_0/eval/mIoU": 55.0, "seed_12/eval/mIoU": 57, "seed_x/eval/mIoU": 1.0,
                              "eval/mIoU": 56.0, "seed_1/pl/quality": 0.9}, "eval/mIoU") == {0: 55.0, 12: 57.0}
    rows = [{"trial": "t1", "eval/mIoU": 58.0, "per_seed": {0: 58.0, 1: 59.0, 2: 57.0}},
            {"trial": "t0", "eval/mIoU": 55.0, "per_seed": {0: 55.0, 1: 56.5, 2: 53.5}},
            {"trial": "t2", "eval/mIoU": 50.0, "per_seed": {0: 50.0}, "stopped_early": True}]
    marks = paired_marks(rows, noise_marks(rows, "eval/mIoU", 4.68))
    # t0 - t1 = -3.0, -2.5, -3.5: mean -3, sd 0.5, half width 4.302653 x 0.5 / sqrt(3) = 1.242
    assert marks == {"t1": "best", "t0": "within noise; paired -3.00 [-4.24, -1.76] *"}
    assert paired_marks(rows[2:], {}) == {}  # single-seed or stopped trials: nothing to pair
