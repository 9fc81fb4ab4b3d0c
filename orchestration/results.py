"""A finished (or interrupted) sweep as tables: per-trial rows, timing, MLflow bookkeeping, files.

Rows come from Ray's result grid (every reported row of every trial) joined with the Optuna study
(trial state, user attrs). They are ranked with full-budget trials first (Optuna state COMPLETE, by the
sweep metric), then trials stopped early by ASHA (PRUNED, by how many evaluations they reached, then
by their last score), then failures.

Timing (docs/sweeps.md). Sweep wall time W is the sum of the driver sessions' wall-clock intervals (a
resumed sweep has several). Every trial report carries the interval since the trial's previous report
returned (or since the attempt entered `run_training`): those segments are the time spent inside trial
training, with Ray's checkpoint upload and scheduling left out. `train_sum_s` adds the segments over
all trials; `train_busy_s` is the length of their union, the wall-clock time during which at least one
trial was training. The orchestration overhead fraction is (W - train_busy_s) / W: the share of the
sweep's wall time in which no trial was training (Ray and MLflow start-up, worker start, imports,
checkpoint persistence, trial scheduling, the final summary). With concurrent trials a plain
(W - train_sum_s) / W could go negative; the union cannot. `slot_utilisation` = train_sum_s /
(W x max_concurrent) says how full the concurrent trial slots were.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from orchestration import stats
from orchestration.keys import NUMBER_KEY, error_line, sampled_params, trial_key

TABLE_METRICS = ("eval/mIoU", "pl/quantity", "pl/quality", "pl/quantity_no_refine", "pl/quality_no_refine")
TOP_N = 10
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1}


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def collect_rows(grid, study, m) -> list[dict[str, Any]]:
    """One row per Ray trial, best first (see the module docstring for the order)."""
    by_number = {t.number: t for t in study.trials}
    rows = []
    for r in grid:
        config = r.config or {}
        if NUMBER_KEY not in config:
            continue
        number = int(config[NUMBER_KEY])
        metrics = r.metrics or {}
        ot = by_number.get(number)
        df = r.metrics_dataframe
        segments = []
        if df is not None and "trial/segment_start" in df:
            segments = [(float(a), float(b)) for a, b in zip(df["trial/segment_start"], df["trial/time"],
                                                             strict=True) if _num(a) and _num(b) and b >= a]
        progress = _num(metrics.get("trial/progress"))
        row: dict[str, Any] = {
            "trial": trial_key(m.name, config), "optuna_trial": number,
            "state": ot.state.name if ot is not None else "UNKNOWN",
            "default": bool(ot.user_attrs.get("default")) if ot is not None else False,
            "evaluations": int(metrics.get("training_iteration", 0) or 0),
            "progress": progress, "stopped_early": progress is not None and progress < 1.0,
            "best_seen": _num(df[m.metric].max()) if df is not None and m.metric in df else None,
            "resumed_from": metrics.get("trial/resumed_from"), "node_ip": metrics.get("trial/node_ip"),
            # every node the trial reported from (a retried trial may move)
            "node_ips": sorted(set(df["trial/node_ip"].dropna())) if df is not None and "trial/node_ip" in df
            else [],
            "train_s": sum(b - a for a, b in segments),
            # data and model build inside the trainer (s4mc/train/loop.py), part of train_s
            "startup_s": _num(metrics.get("trial/startup_s")),
            "error": error_line(r.error),
            "params": sampled_params(config),
            "segments": segments,
        }
        for key in dict.fromkeys((m.metric, *TABLE_METRICS)):
            row[key] = _num(metrics.get(key))
        row["per_seed"] = stats.seed_scores(metrics, m.metric)  # multi-seed trials only (trial.py)
        rows.append(row)
    rows = _one_per_trial(rows)
    sign = -1.0 if m.mode == "max" else 1.0

    def order(row):
        value = row.get(m.metric)
        return (_STATE_ORDER.get(row["state"], 2), -row["evaluations"],
                sign * value if value is not None else math.inf)
    return sorted(rows, key=order)


def _one_per_trial(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial key. Ray can hold two results for one Optuna trial (a trial that failed to
    start on a reused actor and was asked for again): the one that got furthest stands for the trial,
    and the training time of both counts."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        kept = by_key.get(row["trial"])
        if kept is None:
            by_key[row["trial"]] = row
            continue
        first, second = sorted((kept, row), key=lambda r: (r["evaluations"], r["error"] is None), reverse=True)
        first["segments"] = sorted(set(first["segments"]) | set(second["segments"]))
        first["train_s"] = sum(b - a for a, b in first["segments"])
        by_key[row["trial"]] = first
    return list(by_key.values())


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _clip(segments, windows):
    return [(max(a, s), min(b, e)) for a, b in segments for s, e in windows if min(b, e) > max(a, s)]


def summarise(rows: list[dict[str, Any]], sessions: list[list[float | None]], concurrency: int
              ) -> dict[str, float]:
    windows = [(s, e) for s, e in sessions if s is not None and e is not None]
    wall = sum(e - s for s, e in windows)
    segments = _clip([seg for row in rows for seg in row["segments"]], windows)
    busy = _union_length(segments)
    train_sum = sum(b - a for a, b in segments)
    startups = [row["startup_s"] for row in rows if row.get("startup_s") is not None]
    return {"wall_s": wall, "train_busy_s": busy, "train_sum_s": train_sum,
            "startup_sum_s": sum(startups), "startup_max_s": max(startups, default=math.nan),
            "overhead_fraction": (wall - busy) / wall if wall > 0 else math.nan,
            "slot_utilisation": train_sum / (wall * concurrency) if wall > 0 else math.nan,
            "sessions": len(windows)}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def noise_marks(rows: list[dict[str, Any]], metric: str, floor: float | None, mode: str = "max"
                ) -> dict[str, str]:
    """trial -> "best" | "within noise" | "beyond noise" for trials with a full-budget score.

    Only full-budget trials are compared: an early-stopped trial's score is from a shorter run."""
    if floor is None:
        return {}
    full = [r for r in rows if not r.get("stopped_early") and isinstance(r.get(metric), (int, float))]
    if not full:
        return {}
    best = (max if mode == "max" else min)(r[metric] for r in full)
    marks = {}
    for r in full:
        gap = abs(best - r[metric])
        marks[r["trial"]] = "best" if gap == 0 else ("within noise" if gap <= floor else "beyond noise")
    return marks


def paired_marks(rows: list[dict[str, Any]], marks: dict[str, str]) -> dict[str, str]:
    """Adds to each full-budget multi-seed trial's mark its paired-by-seed difference to the best trial
    (orchestration/stats.py); rows are ranked, so the best is the first full-budget row."""
    full = {r["trial"]: r["per_seed"] for r in rows if not r.get("stopped_early") and len(r.get("per_seed") or {}) > 1}
    best = next((r["trial"] for r in rows if r["trial"] in full), None)
    if best is None:
        return marks
    out = {**marks, best: marks.get(best, "best")}
    for trial, p in stats.paired_vs_best(full, best).items():
        out[trial] = f"{marks.get(trial, '-')}; paired {stats.fmt_paired(p)}"
    return out


def table(rows: list[dict[str, Any]], metric: str, n: int = TOP_N, marks: dict[str, str] | None = None) -> str:
    """The top trials as a Markdown table (also printed to the console)."""
    params = list(dict.fromkeys(k for row in rows[:n] for k in row["params"]))
    extra = ["vs best"] if marks else []
    cols = ["trial", "state", "evaluations", *dict.fromkeys((metric, *TABLE_METRICS)), *extra, *params]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows[:n]:
        cells = [_fmt(marks.get(row["trial"], "-") if c == "vs best" else
                      row.get(c) if c not in params else row["params"].get(c)) for c in cols]
        if row.get("default"):
            cells[0] += " (default)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ui_command(m, manifest_path: str | None) -> str:
    if m.tracking.uri.startswith(("http://", "https://")):
        return f"open {m.tracking.uri} (experiment {m.tracking.experiment})"
    return f"make ui MANIFEST={manifest_path or '<manifest>'}"


def write_outputs(result, m, manifest_path: str | None, echo=print) -> list[Path]:
    """results.csv, results.md and summary.json in the sweep folder, and the console summary."""
    rows, timing, out = result.rows, result.timing, result.sweep_dir
    flat = []
    for row in rows:
        base = {k: v for k, v in row.items() if k not in ("params", "segments", "per_seed")}
        flat.append({**base, **{f"param.{k}": v for k, v in row["params"].items()}})
    header = list(dict.fromkeys(k for row in flat for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(flat)
    best = result.best
    best_text = (f"best configuration: {best['trial']} {m.metric} = {_fmt(best.get(m.metric))}\n"
                 + "\n".join(f"  {k} = {v!r}" for k, v in best["params"].items())) if best else \
        "best configuration: none (no trial completed its full budget)"
    timing_text = (f"sweep wall time {timing['wall_s']:.1f} s over {timing['sessions']} session(s); inside trial "
                   f"training {timing['train_sum_s']:.1f} s summed over trials, {timing['train_busy_s']:.1f} s "
                   f"wall-clock with >= 1 trial training; orchestration overhead "
                   f"{100 * timing['overhead_fraction']:.1f}% of wall time; trial-slot utilisation "
                   f"{100 * timing['slot_utilisation']:.1f}%; trial start-up (data and model build, part of "
                   f"training) {timing['startup_sum_s']:.1f} s summed, at most {timing['startup_max_s']:.1f} s "
                   f"(docs/sweeps.md)")
    floor = m.noise_floor.value
    marks = paired_marks(rows, noise_marks(rows, m.metric, floor, m.mode))
    noise_text = (f"seed noise floor of the default configuration: {floor:g} {m.metric} ({m.noise_floor.source}); "
                  f"'vs best' marks full-budget trials whose gap to the best is within it (no evidence of a "
                  f"difference) or beyond it: {sum(v == 'beyond noise' for v in marks.values())} beyond, "
                  f"{sum(v == 'within noise' for v in marks.values())} within"
                  if floor is not None else "seed noise floor: not measured (noise_floor.value in the manifest)")
    if any("paired" in v for v in marks.values()):
        noise_text += f". {stats.legend()} 'paired' = trial − best over the seeds ({m.seeds})"
    ui = _ui_command(m, manifest_path)
    status = "INTERRUPTED - resume with --resume (make sweep RESUME=1)" if result.interrupted else "finished"
    md = "\n\n".join([f"# Sweep {m.name} ({status})", best_text.replace("\n  ", "\n- "),
                      f"## Top trials ({len(rows)} in all, ranked: full budget first)", noise_text,
                      table(rows, m.metric, marks=marks),
                      "## Timing", timing_text, f"MLflow UI: `{ui}`"]) + "\n"
    (out / "results.md").write_text(md)
    summary = {"name": m.name, "status": "interrupted" if result.interrupted else "finished",
               "metric": m.metric, "mode": m.mode, "best": {k: v for k, v in (best or {}).items() if k != "segments"},
               "timing": timing, "num_trials": len(rows), "states": _count(rows, "state"),
               "stopped_early": sum(r["stopped_early"] for r in rows), "errors": result.errors,
               "parent_run_id": result.parent_run_id, "tracking_uri": m.tracking.uri,
               "experiment": m.tracking.experiment, "storage": m.storage, "ui": ui,
               "noise_floor": {"value": floor, "source": m.noise_floor.source, "marks": marks}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    echo(f"\n[sweep {m.name}] {status}: {len(rows)} trials {_count(rows, 'state')}")
    echo(best_text)
    echo(noise_text)
    echo(table(rows, m.metric, marks=marks))
    echo(timing_text)
    for err in result.errors:
        echo(f"error: {err}")
    echo(f"results: {out / 'results.md'} (also results.csv, summary.json)")
    echo(f"MLflow UI: {ui}")
    return [out / "results.csv", out / "results.md", out / "summary.json"]


def _count(rows, key) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        out[row[key]] = out.get(row[key], 0) + 1
    return out
