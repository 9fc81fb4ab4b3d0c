"""Figures for a run: pseudo-label quantity / quality over training (paper Figure 4) and eval curves.

Both read the run folder's CSV files (docs/architecture.md) or equivalent lists of row dicts and write
a PNG. They draw on `matplotlib.figure.Figure` with the Agg canvas directly, never through pyplot, so
they hold no global state, need no display and are safe in Ray workers and threads.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Rows = Iterable[Mapping[str, object]]

# Columns of train.csv (docs/architecture.md, metric vocabulary); fractions in [0, 1].
FIG4_PANELS = (
    ("Pseudo-label quantity", "unlabeled pixels pseudo-labelled (%)", "pl/quantity", "pl/quantity_no_refine"),
    ("Pseudo-label quality", "correct pseudo-labels (%)", "pl/quality", "pl/quality_no_refine"),
)
WITH_LABEL, WITHOUT_LABEL = "with refinement (S4MC)", "without refinement"
SMOOTH_POINTS = 15  # auto window = about 1/15 of the logged points: shows the trend, keeps the shape
DPI = 120


def read_rows(source: str | Path | Rows) -> list[dict[str, object]]:
    """A CSV path or an iterable of row dicts -> list of dicts."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file {path} does not exist")
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    return [dict(r) for r in source]


def _float(value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out


def series(rows: list[dict[str, object]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have a finite value for key, sorted by step."""
    pairs = [(_float(r.get("step")), _float(r.get(key))) for r in rows]
    pairs = sorted((s, v) for s, v in pairs if math.isfinite(s) and math.isfinite(v))
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps), np.asarray(values)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; the window shrinks at both ends so the curve keeps its length."""
    if window <= 1 or values.size < 2:
        return values.astype(float)
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    idx = np.arange(values.size)
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, values.size)
    return (csum[hi] - csum[lo]) / (hi - lo)


def _window(n: int, smooth: int | None) -> int:
    return max(1, smooth if smooth is not None else n // SMOOTH_POINTS)


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI)
    return out


def figure4(train_csv_or_rows: str | Path | Rows, out_png: str | Path, smooth: int | None = None,
            title: str | None = None) -> Path:
    """Pseudo-label quantity (left) and quality (right) with vs without refinement over steps.

    Like paper Figure 4. Raw values are drawn faintly, their moving average (window `smooth`, default
    about 1/15 of the points) solidly. Columns missing from the data (no `_no_refine` columns when
    refinement is off) are left out; with no pl/* column at all this raises ValueError.
    """
    rows = read_rows(train_csv_or_rows)
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    drawn = 0
    for ax, (panel, ylabel, key_with, key_without) in zip(axes, FIG4_PANELS, strict=True):
        for key, label, color, style in ((key_with, WITH_LABEL, "tab:blue", "-"),
                                         (key_without, WITHOUT_LABEL, "tab:orange", "--")):
            steps, values = series(rows, key)
            if steps.size == 0:
                continue
            values = 100.0 * values  # fractions -> percent
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, _window(steps.size, smooth)), color=color, linestyle=style,
                    linewidth=2.0, label=label)
            drawn += 1
        ax.set_title(panel)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 2.5 ticks on short runs
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.01)
        if ax.has_data() and not any(a.get_legend() for a in axes):  # one legend: both panels share it
            ax.legend(loc="best", framealpha=0.85)
    if not drawn:
        raise ValueError("figure4: the rows have none of the columns pl/quantity, pl/quality, "
                         "pl/quantity_no_refine, pl/quality_no_refine")
    fig.suptitle(title or "Pseudo-labels over training (cf. S4MC paper, Figure 4)")
    return _save(fig, out_png)


def curves(eval_csv: str | Path | Rows, out_png: str | Path, key: str = "eval/mIoU",
           title: str | None = None) -> Path:
    """eval/mIoU (or `key`) over training steps, the best evaluation marked."""
    rows = read_rows(eval_csv)
    steps, values = series(rows, key)
    if steps.size == 0:
        raise ValueError(f"curves: the rows have no values for {key!r}")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, color="tab:blue", label=key)
    best = int(np.argmax(values))
    ax.scatter([steps[best]], [values[best]], s=60, color="tab:red", zorder=3,
               label=f"best {values[best]:.2f} at step {int(steps[best])}")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{key} (%)" if "IoU" in key else key)
    ax.set_title(title or f"{key} over training")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", framealpha=0.85)
    return _save(fig, out_png)
