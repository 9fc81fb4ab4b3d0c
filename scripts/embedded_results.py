"""Renders the embedded comparison from run folders: a Markdown table and the curves.

Reads each run's summary.json, eval.csv and train.csv (nothing else), so the figures in the README
are exactly what the runs wrote. Usage: python scripts/embedded_results.py runs/embedded docs/embedded_results
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from s4mc.train.callbacks import read_csv

ORDER = ["supervised", "supervised_full", "cutmix_seg", "cutmix_seg_s4mc", "fixmatch", "fixmatch_s4mc",
         "unimatch", "unimatch_s4mc"]


def _f(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def main(runs_dir: str, out_prefix: str) -> None:
    runs = {p.parent.name: p.parent for p in Path(runs_dir).glob("*/summary.json")}
    names = [n for n in ORDER if n in runs] + sorted(set(runs) - set(ORDER))
    lines = ["| run | split | final mIoU | best mIoU | pl quantity % (no refine) | pl quality % (no refine) "
             "| train time s | steps |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        s = json.loads((runs[name] / "summary.json").read_text())
        cfg_split = "all" if name == "supervised_full" else "50"
        rows = read_csv(runs[name] / "eval.csv")
        # pl/* at the last evaluation: averages over the steps since the previous evaluation.
        last = rows[-1] if rows else {}
        q = f"{_f(last.get('pl/quantity'), True)} ({_f(last.get('pl/quantity_no_refine'), True)})"
        a = f"{_f(last.get('pl/quality'), True)} ({_f(last.get('pl/quality_no_refine'), True)})"
        if "pl/quantity" not in last:
            q = a = "—"
        lines.append(f"| {name} | {cfg_split} | {_f(s['final'].get('eval/mIoU'))} | {_f(s['best/eval/mIoU'])} | {q} "
                     f"| {a} | {s['train_time_s']:.0f} | {s['steps']} |")
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    ax_m, ax_q, ax_a = fig.subplots(1, 3)
    for name in names:
        ev = read_csv(runs[name] / "eval.csv")
        ax_m.plot([r["step"] for r in ev], [r["eval/mIoU"] for r in ev], marker="o", ms=3, label=name)
        tr = read_csv(runs[name] / "train.csv")
        if tr and "pl/quantity" in tr[0]:
            steps = [r["step"] for r in tr]
            line, = ax_q.plot(steps, [r["pl/quantity"] for r in tr], label=f"{name}")
            ax_q.plot(steps, [r["pl/quantity_no_refine"] for r in tr], ls=":", color=line.get_color())
            ax_a.plot(steps, [r["pl/quality"] for r in tr], color=line.get_color(), label=f"{name}")
            ax_a.plot(steps, [r["pl/quality_no_refine"] for r in tr], ls=":", color=line.get_color())
    ax_m.set(title="eval/mIoU (val)", xlabel="step", ylabel="mIoU %")
    ax_q.set(title="pl/quantity (solid) vs no refinement (dotted)", xlabel="step")
    ax_a.set(title="pl/quality (solid) vs no refinement (dotted)", xlabel="step")
    for ax in (ax_m, ax_q, ax_a):
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=7)
    ax_q.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
