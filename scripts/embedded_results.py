"""Renders the embedded benchmark's results from run folders: tables, paired differences and plots.

Reads every ``*/summary.json`` under the given folders together with the run's ``config.yaml``,
``eval.csv`` and ``train.csv`` (nothing else), so every figure in the README is what the runs wrote.
A method is (host, S4MC on/off) at one labeled split; seeds are the repetitions. Differences are
*paired by seed* (same seed = same initialisation, batches and augmentation draws), one split at a time,
with orchestration/stats.py (the statistics `make report` prints too): mean difference, 95% Student-t
interval over the seeds (n - 1 degrees of freedom) and whether it excludes 0; one seed says "n = 1, no
interval".

Usage: python scripts/embedded_results.py OUT_PREFIX RUN_DIR [RUN_DIR ...]
writes OUT_PREFIX.md, OUT_PREFIX.json, OUT_PREFIX.png (mIoU curves) and OUT_PREFIX_figure4.png (the
paper's Figure 4 on this benchmark: pseudo-label quantity and quality with and without refinement,
from the same teacher output and threshold, over training).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from orchestration.stats import fmt_paired, legend, mean_std, paired, verdict
from s4mc.train.callbacks import read_csv

HOSTS = ("cutmix_seg", "fixmatch", "unimatch")
LABEL = {"supervised": "Supervised", "cutmix_seg": "CutMix-Seg", "fixmatch": "FixMatch", "unimatch": "UniMatch"}


def method_name(host: str, s4mc: bool, split: str) -> str:
    if host == "supervised":
        return "Full supervision" if split == "all" else "Supervised"
    return LABEL[host] + (" + S4MC" if s4mc else "")


def load_runs(dirs: list[str]) -> list[dict]:
    runs = []
    for d in dirs:
        for summary_path in sorted(Path(d).rglob("summary.json")):
            run = summary_path.parent
            cfg = OmegaConf.load(run / "config.yaml")
            summary = json.loads(summary_path.read_text())
            if summary.get("stopped_early") or summary["steps"] != summary["total_steps"]:
                continue  # an unfinished run is no result
            host, s4mc, split = cfg.host.name, bool(cfg.s4mc.enabled), str(cfg.data.split)
            runs.append({"dir": run, "host": host, "s4mc": s4mc and host != "supervised", "split": split,
                         "seed": int(cfg.train.seed), "method": method_name(host, s4mc, split),
                         "final": summary["final"]["eval/mIoU"], "best": summary["best/eval/mIoU"],
                         "train_s": summary["train_time_s"], "wall_s": summary["wall_time_s"],
                         "eval": read_csv(run / "eval.csv"), "train": read_csv(run / "train.csv")})
    return runs


def last_pl(run: dict) -> dict[str, float]:
    """pl/* over the SSL phase's last evaluation interval (eval.csv averages since the previous eval)."""
    last = run["eval"][-1] if run["eval"] else {}
    return {k: last[k] for k in ("pl/quantity", "pl/quantity_no_refine", "pl/quality", "pl/quality_no_refine")
            if k in last}


def render(runs: list[dict], out: Path) -> dict:
    by = defaultdict(dict)  # (method, split) -> seed -> run
    for r in runs:
        by[(r["method"], r["split"])][r["seed"]] = r
    splits = sorted({r["split"] for r in runs if r["split"] != "all"}, key=int)
    order = ["Supervised"] + [method_name(h, s, "x") for h in HOSTS for s in (False, True)]
    lines = ["| method | split | n | final mIoU | best mIoU | vs supervised (paired) | S4MC vs host (paired) "
             "| pl quantity % (no refine) | pl quality % (no refine) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    results: dict = {"methods": {}, "paired": {}}
    for split in splits:
        sup = {s: r["final"] for s, r in by.get(("Supervised", split), {}).items()}
        for name in order:
            cell = by.get((name, split))
            if not cell:
                continue
            finals = {s: r["final"] for s, r in cell.items()}
            m, sd = mean_std(list(finals.values()))
            b_m, _ = mean_std([r["best"] for r in cell.values()])
            vs_sup = paired(finals, sup) if name != "Supervised" else None
            vs_host = None
            if name.endswith("+ S4MC"):
                base = by.get((name.removesuffix(" + S4MC"), split), {})
                vs_host = paired(finals, {s: r["final"] for s, r in base.items()})
                results["paired"][f"{name} - host @ {split}"] = vs_host
            if vs_sup is not None:
                results["paired"][f"{name} - Supervised @ {split}"] = vs_sup
            pls = [last_pl(r) for r in cell.values()]
            if pls and pls[0]:
                q = {k: 100 * statistics.fmean(p[k] for p in pls) for k in pls[0]}
                ql = f"{q['pl/quantity']:.1f} ({q['pl/quantity_no_refine']:.1f})"
                qa = f"{q['pl/quality']:.1f} ({q['pl/quality_no_refine']:.1f})"
            else:
                ql = qa = "—"
            train_s = statistics.fmean(r["train_s"] for r in cell.values())
            lines.append(f"| {name} | {split} | {len(cell)} | {m:.2f} ± {sd:.2f} | {b_m:.2f} | "
                         f"{fmt_paired(vs_sup) if vs_sup else '—'} | {fmt_paired(vs_host) if vs_host else '—'} "
                         f"| {ql} | {qa} | {train_s:.0f} |")
            results["methods"][f"{name} @ {split}"] = {"n": len(cell), "mean": m, "std": sd, "best_mean": b_m,
                                                       "finals": finals, "train_s": train_s}
    full = by.get(("Full supervision", "all"))
    if full:
        m, sd = mean_std([r["final"] for r in full.values()])
        train_s = statistics.fmean(r["train_s"] for r in full.values())
        lines.append(f"| Full supervision | all | {len(full)} | {m:.2f} ± {sd:.2f} | "
                     f"{statistics.fmean(r['best'] for r in full.values()):.2f} | — | — | — | — | {train_s:.0f} |")
        results["methods"]["Full supervision @ all"] = {"n": len(full), "mean": m, "std": sd, "train_s": train_s,
                                                        "finals": {s: r["final"] for s, r in full.items()}}
    lines += ["", "Final mIoU: mean ± std over seeds at the last evaluation. The paired columns compare final "
              "mIoU one split at a time. " + legend()]
    lines += pooled_lines(by, splits, order, results)
    wall = [r["wall_s"] for r in runs]
    results["run_wall_s"] = {"max": max(wall), "mean": statistics.fmean(wall)} if wall else {}
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines))
    return results


def pooled_lines(by: dict, splits: list[str], order: list[str], results: dict) -> list[str]:
    """Each S4MC row against its host over every split at once: pairs are (split, seed)."""
    if len(splits) < 2:
        return []
    out = ["", f"Pooled over splits {', '.join(splits)} (paired by split and seed; the spread between splits "
           "counts as noise, so this interval is wider when the gain depends on the split):", "",
           "| comparison | pairs | mean difference [95% t interval] | verdict |", "|---|---|---|---|"]
    for name in (n for n in order if n.endswith(" + S4MC")):
        host = name.removesuffix(" + S4MC")
        for other in (host, "Supervised"):
            a = {(sp, s): r["final"] for sp in splits for s, r in by.get((name, sp), {}).items()}
            b = {(sp, s): r["final"] for sp in splits for s, r in by.get((other, sp), {}).items()}
            p = paired(a, b)
            if p["n"]:
                results["paired"][f"{name} - {other} @ pooled"] = p
                out.append(f"| {name} − {other} | {p['n']} | {fmt_paired(p)} | {verdict(p)} |")
    return out


def _band(ax, runs: list[dict], key: str, source: str, **kw):
    """Mean over seeds (line) and min-max band of one column, aligned by step."""
    series = [{row["step"]: row[key] for row in r[source] if key in row} for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return None
    vals = [[s[t] for s in series] for t in steps]
    mean = [statistics.fmean(v) for v in vals]
    line, = ax.plot(steps, mean, **kw)
    ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15, color=line.get_color())
    return line


def plot_curves(runs: list[dict], out: Path, split: str) -> None:
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = sorted({r["method"] for r in runs if r["split"] in (split, "all")})
    for name in names:
        group = [r for r in runs if r["method"] == name and r["split"] in (split, "all")]
        _band(ax, group, "eval/mIoU", "eval", marker="o", ms=3, label=f"{name} (n = {len(group)})",
              ls="--" if "S4MC" not in name and name not in ("Supervised", "Full supervision") else "-")
    ax.set(title=f"eval/mIoU on the embedded benchmark, split {split} (mean, min-max over seeds)",
           xlabel="step", ylabel="mIoU %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def plot_figure4(runs: list[dict], out: Path, split: str) -> None:
    """Paper Figure 4: quantity / quality with (solid) and without (dotted) refinement, S4MC runs."""
    fig = Figure(figsize=(12, 4.2))
    FigureCanvasAgg(fig)
    ax_q, ax_a = fig.subplots(1, 2)
    for host in HOSTS:
        group = [r for r in runs if r["host"] == host and r["s4mc"] and r["split"] == split]
        if not group:
            continue
        name = f"{LABEL[host]} + S4MC (n = {len(group)})"
        line = _band(ax_q, group, "pl/quantity", "train", label=name)
        if line is None:
            continue
        _band(ax_q, group, "pl/quantity_no_refine", "train", ls=":", color=line.get_color())
        _band(ax_a, group, "pl/quality", "train", color=line.get_color(), label=name)
        _band(ax_a, group, "pl/quality_no_refine", "train", ls=":", color=line.get_color())
    ax_q.set(title=f"pl/quantity: refined (solid) vs unrefined (dotted), split {split}", xlabel="step")
    ax_a.set(title="pl/quality: refined (solid) vs unrefined (dotted)", xlabel="step")
    for ax in (ax_q, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_figure4.png", dpi=110)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python scripts/embedded_results.py OUT_PREFIX RUN_DIR [RUN_DIR ...]")
    out = Path(argv[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = load_runs(argv[1:])
    if not runs:
        sys.exit(f"error: no finished run (summary.json with all steps) under {', '.join(argv[1:])}")
    render(runs, out)
    split = min((r["split"] for r in runs if r["split"] != "all"), key=int)
    plot_curves(runs, out, split)
    plot_figure4(runs, out, split)
    print(f"wrote {out}.md, {out}.json, {out}.png and {out.name}_figure4.png")


if __name__ == "__main__":
    main(sys.argv[1:])
