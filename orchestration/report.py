"""`report`: a paper table rebuilt from its MLflow runs, beside the published numbers.

The runs of a table are the MLflow child runs tagged `table=<id>` and `s4mc.role=trial` (written by
orchestration/reproduce.py; a `runs_from` table such as Table 9 reads the runs of its source table). For
every cell (tags row, column) "ours" is the mean ± sample standard deviation (ddof 1; none with one seed)
over seeds of the final value of the table's metric, taken from FINISHED runs only, the newest run per
seed when a seed ran twice. Beside it: the published value (docs/method.md §8), the difference ours −
published and whether it lies within the cell's tolerance; a cell with a published difference (Table 8)
also gets ours − ours(delta_of row). Cells without a finished run show "—" and are listed as missing;
a cell with one seed says "n = 1, no interval". Paired comparisons (orchestration/stats.py,
docs/statistics.md): each row against its baselines in the same column (`_baselines`), paired by seed,
then pooled over the columns that hold the pair (pairs = (column, seed)): mean difference, 95% Student-t
interval, whether it excludes 0, and beside it the published difference and whether ours lies within the
tolerance of it. Outputs: <out_dir>/<table>.md, .csv and .png (a grouped bar chart: columns on the x axis,
one bar per row with the seed std as error bar, published values as black markers). Default out_dir:
docs/reports.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from orchestration import stats
from orchestration.paper import PROJECT_DIR, LoadedTable, load_table, split_label
from s4mc.config import ConfigError

DASH = "—"
FIELDS = ("table", "cell", "row", "column", "host", "split", "metric", "seeds_expected", "seeds_finished",
          "values", "mean", "std", "published", "published_std", "difference", "tolerance", "within_tolerance",
          "delta_of", "ours_delta", "published_delta", "delta_difference", "status")


def _final_values(runs: list, metric: str) -> dict[tuple[str, str], dict[int, float]]:
    """(row, column) -> {seed: final metric} from FINISHED runs, the newest run per seed."""
    newest: dict[tuple[str, str, int], Any] = {}
    for r in runs:
        tags = r.data.tags
        if r.info.status != "FINISHED" or metric not in r.data.metrics or "seed" not in tags:
            continue
        key = (tags.get("row"), tags.get("column"), int(tags["seed"]))
        if key not in newest or (r.info.end_time or 0) > (newest[key].info.end_time or 0):
            newest[key] = r
    out: dict[tuple[str, str], dict[int, float]] = {}
    for (row, column, seed), r in newest.items():
        out.setdefault((row, column), {})[seed] = float(r.data.metrics[metric])  # latest value = final
    return out


def summarise(loaded: LoadedTable, values: dict[tuple[str, str], dict[int, float]]) -> list[dict[str, Any]]:
    t = loaded.spec
    rows = []
    for rc in loaded.cells:
        c = rc.cell
        seeds = values.get((c.row, c.column), {})
        vals = [seeds[s] for s in sorted(seeds)]
        mean = statistics.fmean(vals) if vals else None
        std = statistics.stdev(vals) if len(vals) > 1 else None
        tol = c.tolerance or t.tolerance
        diff = mean - c.published if mean is not None and c.published is not None else None
        cfg = rc.config
        rows.append({"table": t.table, "cell": rc.id, "row": c.row, "column": c.column, "host": cfg.host.name,
                     "split": split_label(cfg), "metric": t.metric,
                     "seeds_expected": len(t.seeds), "seeds_finished": len(vals),
                     "values": ";".join(f"{v:.4f}" for v in vals), "mean": mean, "std": std,
                     "published": c.published, "published_std": c.published_std, "difference": diff,
                     "tolerance": tol, "within_tolerance": None if diff is None else abs(diff) <= tol,
                     "delta_of": c.delta_of, "ours_delta": None, "published_delta": c.published_delta,
                     "delta_difference": None,
                     "status": "missing" if not vals else "partial" if len(vals) < len(t.seeds) else "complete"})
    by_key = {(r["row"], r["column"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["delta_of"], r["column"])) if r["delta_of"] else None
        if ref and r["mean"] is not None and ref["mean"] is not None:
            r["ours_delta"] = r["mean"] - ref["mean"]
            r["delta_difference"] = r["ours_delta"] - r["published_delta"]
            r["within_tolerance"] = abs(r["delta_difference"]) <= r["tolerance"]
    return rows


def _baselines(methods: list[str], row: str, delta_of: str | None) -> list[str]:
    """The rows of the same column that `row` is compared with (docs/statistics.md): its delta_of row; for
    "<host> + S4MC" the host row ("<host>" or "<host> (re-run)"); else the column's "(paper best)" row;
    and "Supervised"."""
    out = [delta_of] if delta_of else []
    if row.endswith(" + S4MC"):
        host = row.removesuffix(" + S4MC")
        out += [h for h in (host, f"{host} (re-run)") if h in methods][:1]
    best = [m for m in methods if m.endswith("(paper best)")]
    if best and not out:
        out.append(best[0])
    if "Supervised" in methods:
        out.append("Supervised")
    return [b for b in dict.fromkeys(out) if b != row]


def _comparison(a: dict[str, Any], b: dict[str, Any], pairs: tuple[dict, dict], column: str) -> dict[str, Any]:
    if a["delta_of"] == b["row"]:
        published = a["published_delta"]
    else:
        published = a["published"] - b["published"] if None not in (a["published"], b["published"]) else None
    p = stats.paired(*pairs)
    diff = p["mean"] - published if published is not None and p["n"] else None
    return {"a": a["row"], "b": b["row"], "column": column, "paired": p, "published": published,
            "tolerance": a["tolerance"], "difference": diff,
            "within_tolerance": None if diff is None else abs(diff) <= a["tolerance"]}


def comparisons(rows: list[dict[str, Any]], values: dict[tuple[str, str], dict[int, float]]
                ) -> list[dict[str, Any]]:
    """Paired-by-seed comparisons per column, then pooled over columns (pairs = (column, seed)) for every
    comparison that more than one column holds."""
    by_key = {(r["row"], r["column"]): r for r in rows}
    out, pooled = [], {}
    for r in rows:
        methods = [x["row"] for x in rows if x["column"] == r["column"]]
        for base in _baselines(methods, r["row"], r["delta_of"]):
            b, col = by_key[(base, r["column"])], r["column"]
            a_vals, b_vals = values.get((r["row"], col), {}), values.get((base, col), {})
            out.append(_comparison(r, b, (a_vals, b_vals), col))
            ka, kb = pooled.setdefault((r["row"], base), ({}, {}))
            ka.update({(col, s): v for s, v in a_vals.items()})
            kb.update({(col, s): v for s, v in b_vals.items()})
    columns = {(c["a"], c["b"]): {x["column"] for x in out if (x["a"], x["b"]) == (c["a"], c["b"])} for c in out}
    for (a, base), pairs in pooled.items():
        if len(columns[(a, base)]) > 1:
            c = stats.paired(*pairs)
            out.append({"a": a, "b": base, "column": "pooled", "paired": c, "published": None,
                        "tolerance": None, "difference": None, "within_tolerance": None})
    return out


def _published_diff(c: dict[str, Any]) -> str:
    if c["column"] == "pooled":
        return DASH  # the paper publishes no pooled numbers
    return "unknown" if c["published"] is None else _num(c["published"], True)


def render_comparisons(comps: list[dict[str, Any]]) -> list[str]:
    if not comps:
        return []
    out = ["", "## Paired comparisons", "", stats.legend() + " Published difference: published(a) − "
           "published(b) (Table 8: the published delta); within tolerance: |ours − published| ≤ the tolerance. "
           "'pooled': every column at once, pairs = (column, seed), so the spread between columns counts as noise.",
           "", "| a − b | column | pairs | ours: mean [95% t interval] | interval | published | ours − published "
           "| within tolerance |", "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        p, within = c["paired"], c["within_tolerance"]
        out.append(f"| {c['a']} − {c['b']} | {c['column']} | {p['n']} | {stats.fmt_paired(p)} | {stats.verdict(p)} "
                   f"| {_published_diff(c)} "
                   f"| {_num(c['difference'], True)} | {DASH if within is None else ('yes' if within else '**no**')} |")
    return out


def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return DASH
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _ours(r: dict[str, Any]) -> str:
    if r["mean"] is None:
        return DASH
    spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
    notes = [stats.NO_INTERVAL] if r["seeds_finished"] == 1 else []
    notes += [f"{r['seeds_finished']}/{r['seeds_expected']} seeds"] if r["status"] == "partial" else []
    return f"{r['mean']:.2f}{spread}" + (f" ({'; '.join(notes)})" if notes else "")


def _published(r: dict[str, Any]) -> str:
    if r["published"] is None:
        return "unknown"
    return f"{r['published']:g}" + (f" ± {r['published_std']:g}" if r["published_std"] is not None else "")


def render_markdown(loaded: LoadedTable, rows: list[dict[str, Any]], tracking_uri: str,
                    comps: list[dict[str, Any]] = ()) -> str:
    t = loaded.spec
    columns = list(dict.fromkeys(r["column"] for r in rows))
    methods = list(dict.fromkeys(r["row"] for r in rows))
    by_key = {(r["row"], r["column"]): r for r in rows}
    source = f" (trainings of {t.runs_from})" if t.runs_from else ""
    out = [f"# {t.table}: {t.title}", "",
           f"Metric `{t.metric}` (%), ours = mean ± std over seeds {list(t.seeds)} of the final value, FINISHED "
           f"MLflow runs tagged `table={t.runs_from or t.table}`{source}; tracking store `{tracking_uri}`. "
           f"Published values: {t.source} (unknown = not recoverable; never guessed). Tolerance ±{t.tolerance:g}: "
           f"{t.tolerance_basis or 'see the manifest'}", "",
           "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in methods:
        cells = []
        for col in columns:
            r = by_key.get((m, col))
            cells.append("" if r is None else f"{_ours(r)} / {_published(r)}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "Cells read `ours / published`.", "", "## Cells", "",
            "| id | method | column | seeds | ours | published | ours − published | within tolerance | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        within = DASH if r["within_tolerance"] is None else ("yes" if r["within_tolerance"] else "**no**")
        note = ""
        if r["published_delta"] is not None:
            note = (f"vs {r['delta_of']}: ours {_num(r['ours_delta'], True)}, published "
                    f"{r['published_delta']:+g}")
        out.append(f"| {r['cell']} | {r['row']} | {r['column']} | {r['seeds_finished']}/{r['seeds_expected']} | "
                   f"{_ours(r)} | {_published(r)} | {_num(r['difference'], True)} | {within} | {note} |")
    out += render_comparisons(list(comps))
    missing = [r for r in rows if r["status"] == "missing"]
    out += ["", f"## Missing cells ({len(missing)})", ""]
    out += [f"- {r['cell']} {r['row']} | {r['column']}: no FINISHED run" for r in missing] or ["none"]
    if t.notes.strip():
        out += ["", "## Notes", "", t.notes.strip()]
    return "\n".join(out) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r[k] is None else r[k] for k in FIELDS})


def render_png(loaded: LoadedTable, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    t = loaded.spec
    columns = list(dict.fromkeys(r["column"] for r in rows))
    methods = list(dict.fromkeys(r["row"] for r in rows))
    by_key = {(r["row"], r["column"]): r for r in rows}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, 5.0 + 0.45 * len(columns) * len(methods)), 4.5))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(columns))]
        cells = [by_key.get((m, col)) for col in columns]
        means = [c["mean"] if c and c["mean"] is not None else math.nan for c in cells]
        stds = [c["std"] if c and c["std"] is not None else 0.0 for c in cells]
        bars = ax.bar(xs, means, width * 0.92, yerr=stds, capsize=2, label=m)
        pub = [c["published"] if c and c["published"] is not None else math.nan for c in cells]
        ax.scatter(xs, pub, marker="D", s=18, color="black", zorder=3,
                   label="published (docs/method.md §8)" if i == 0 else None)
        for x, c in zip(xs, cells, strict=True):
            if c is not None and c["mean"] is None:  # a missing cell: a dash at the foot of its slot
                ax.text(x, 0.01, DASH, ha="center", va="bottom", color=bars.patches[0].get_facecolor(),
                        transform=ax.get_xaxis_transform(), clip_on=True)
    values = [v for r in rows for v in (r["mean"], r["published"]) if v is not None]
    ax.set_ylim(0, 1.08 * max(values, default=100.0))  # mIoU from 0: bar heights compare honestly
    ax.set_xlim(-0.5, len(columns) - 0.5)  # fixed: an all-missing table has no bar to fit the limits to
    ax.set_xticks(range(len(columns)), columns)
    ax.set_xlabel("labels / split")
    ax.set_ylabel(f"{t.metric} (%)")
    ax.set_title(f"{t.table}: ours (bars, ± seed std) vs published (◆)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" makes room for the legend outside the axes
    plt.close(fig)


def report(table, tracking_uri: str | None = None, out_dir: str | Path | None = None, echo=print,
           overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Builds <out_dir>/<table>.{md,csv,png} from the MLflow runs; returns the rows and the file paths."""
    loaded = table if isinstance(table, LoadedTable) else load_table(table, overrides)
    t = loaded.spec
    from orchestration import tracking as trk

    uri = trk.configure(tracking_uri or t.tracking.uri, project_dir=t.project)
    runs = trk.table_runs(uri, t.runs_from or t.table)
    values = _final_values(runs, t.metric)
    rows = summarise(loaded, values)
    comps = comparisons(rows, values)
    out = Path(out_dir) if out_dir is not None else PROJECT_DIR / "docs" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    files = {ext: out / f"{t.table}.{ext}" for ext in ("md", "csv", "png")}
    files["md"].write_text(render_markdown(loaded, rows, uri, comps))
    write_csv(rows, files["csv"])
    render_png(loaded, rows, files["png"])
    missing = [r for r in rows if r["status"] == "missing"]
    echo(f"[report {t.table}] {len(rows) - len(missing)}/{len(rows)} cells with finished runs "
         f"({len(runs)} runs read); missing: {len(missing)}")
    echo(f"wrote {files['md']}, {files['csv']}, {files['png']}")
    return {"rows": rows, "files": files, "missing": missing, "comparisons": comps}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True, help="table id (experiments/paper/<id>.yaml) or a manifest path")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the project's "
                                          "sqlite:///<project>/mlruns/mlflow.db)")
    p.add_argument("--out-dir", help="output folder (default docs/reports)")


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `report` on an argparse subparsers object; the handler is `args.handler(args)`."""
    p = subparsers.add_parser("report", help="render a paper table from its MLflow runs (Markdown, CSV, PNG)",
                              description="Ours (mean ± std over seeds) beside the published values, with the "
                                          "differences and the missing cells.")
    _add_arguments(p)
    p.set_defaults(handler=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    try:
        report(args.table, tracking_uri=args.tracking_uri, out_dir=args.out_dir)
    except ConfigError as exc:
        print(f"s4mc-sweep report: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.report", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
