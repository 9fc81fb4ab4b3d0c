"""The statistics of every comparison the project reports: paired differences with 95% t intervals.

One place for the arithmetic that `make report` (orchestration/report.py), the sweep summary
(orchestration/results.py) and the embedded benchmark's table (scripts/embedded_results.py) print, so
that the three say the same thing the same way. Pure standard library + scipy (the t quantile); no
s4mc, MLflow or Ray.

Pairing. Two methods are compared on the runs they share: the same seed (same initialisation, batch
order and augmentation draws) and, where a table has several label splits, the same split, so a key is
a seed or a (split, seed) pair. The differences d_i = a_i - b_i give the mean difference, its 95%
Student-t interval mean ± t(0.975, n - 1) · sd(d) / sqrt(n) (docs/statistics.md says why t and not a
bootstrap: with 3-6 pairs a bootstrap has only 10-462 distinct resamples), and whether the interval
excludes 0. With one pair there is no spread to estimate: "n = 1, no interval". With none: "—".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from scipy.stats import t as student_t

LEVEL = 0.95  # the confidence level of every interval we print (docs/statistics.md)
METHOD = "Student t"
DASH = "—"
NO_INTERVAL = "n = 1, no interval"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1); nan std with one value, (nan, nan) with none."""
    vals = list(values)
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def t_half_width(diffs: list[float], level: float = LEVEL) -> float:
    """Half width of the t interval of the mean of diffs (n >= 2)."""
    if len(diffs) < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {len(diffs)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must lie strictly between 0 and 1")
    return float(student_t.ppf(0.5 + level / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def paired(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = LEVEL) -> dict[str, Any]:
    """a - b over the keys (seeds, or (split, seed) pairs) both have.

    Returns n, keys, diffs, mean (nan when n = 0), and for n >= 2 lo, hi and excludes_zero; for n < 2
    those three are None."""
    keys = sorted(set(a) & set(b), key=str)  # str: seeds and (split, seed) tuples sort alike
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    out: dict[str, Any] = {"n": len(diffs), "keys": keys, "diffs": diffs, "level": level, "method": METHOD,
                           "mean": statistics.fmean(diffs) if diffs else math.nan,
                           "lo": None, "hi": None, "excludes_zero": None}
    if len(diffs) > 1:
        half = t_half_width(diffs, level)
        out.update(lo=out["mean"] - half, hi=out["mean"] + half, excludes_zero=abs(out["mean"]) > half)
    return out


def seed_scores(metrics: Mapping[str, Any], metric: str) -> dict[int, float]:
    """{seed: value} from a multi-seed trial's report keys `seed_<s>/<metric>` (orchestration/trial.py)."""
    out = {}
    for key, value in metrics.items():
        head, _, rest = str(key).partition("/")
        if rest == metric and head.startswith("seed_") and head[5:].isdigit() and isinstance(value, int | float):
            out[int(head[5:])] = float(value)
    return out


def paired_vs_best(per_seed: Mapping[str, Mapping[int, float]], best: str) -> dict[str, dict[str, Any]]:
    """trial -> paired(trial, best) over their common seeds, for every trial but the best."""
    return {k: paired(v, per_seed[best]) for k, v in per_seed.items() if k != best and best in per_seed}


def fmt_paired(p: Mapping[str, Any] | None, digits: int = 2) -> str:
    """'+3.10 [+0.46, +5.75] *' (* = the interval excludes 0), '+1.20 (n = 1, no interval)' or '—'."""
    if p is None or p["n"] == 0:
        return DASH
    if p["n"] == 1:
        return f"{p['mean']:+.{digits}f} ({NO_INTERVAL})"
    mark = " *" if p["excludes_zero"] else ""
    return f"{p['mean']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]{mark}"


def verdict(p: Mapping[str, Any] | None) -> str:
    """In words, for a table column: 'excludes 0', 'includes 0', 'n = 1, no interval' or '—'."""
    if p is None or p["n"] == 0:
        return DASH
    if p["n"] == 1:
        return NO_INTERVAL
    return "excludes 0" if p["excludes_zero"] else "includes 0"


def legend(level: float = LEVEL) -> str:
    """One sentence for under a table that shows fmt_paired cells."""
    return (f"Paired: mean difference over the same seeds (and splits), with its {100 * level:g}% {METHOD} "
            f"interval (n - 1 degrees of freedom); * = the interval excludes 0; one pair: {NO_INTERVAL}.")
