"""A sweep's analysis views: Optuna's four standard plots of its study, as HTML and PNG files.

`write_study_plots(study, out_dir)` writes parallel coordinates (every sampled parameter against the
score), parameter importances (fANOVA, Optuna's default evaluator, seeded so that one study always
gives the same bars), intermediate values (the score at every evaluation of every trial: what ASHA saw
when it stopped a trial) and the optimisation history (score by trial number, with the best so far).
HTML comes from Optuna's plotly backend, self-contained (plotly.js inlined, ~4.8 MB a file) because
sweep machines and the MLflow artifact viewer have no internet to fetch it from; PNG comes from
Optuna's matplotlib backend, so no kaleido / Chrome is needed to export images.
The sweep driver calls it at the end of a sweep (orchestration/results.py) and logs the files as
artifacts of the MLflow parent run; `python -m orchestration.study_plots STORAGE STUDY OUT_DIR` draws
them for any existing study.

A study without a finished (COMPLETE or PRUNED) trial gets no plots; a plot that fails to draw is
skipped with one log line saying why, and the others are still written.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import optuna

log = logging.getLogger(__name__)

# name -> Optuna function (same name in optuna.visualization and optuna.visualization.matplotlib)
PLOTS = {"parallel_coordinate": "plot_parallel_coordinate", "param_importances": "plot_param_importances",
         "intermediate_values": "plot_intermediate_values", "optimization_history": "plot_optimization_history"}


def _kwargs(fn_name: str) -> dict:
    # fANOVA fits a random forest: without a fixed seed the importances of one study change per drawing.
    if fn_name == "plot_param_importances":
        return {"evaluator": optuna.importance.FanovaImportanceEvaluator(seed=0)}
    return {}


def _png(study: optuna.Study, fn_name: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; sweep drivers have no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the backend is "experimental"
        ax = getattr(vm, fn_name)(study, **_kwargs(fn_name))
    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
    fig.set_size_inches(max(fig.get_size_inches()[0], 9.0), max(fig.get_size_inches()[1], 5.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": long parameter names stay inside the image
    plt.close(fig)
    return path


def _html(study: optuna.Study, fn_name: str, path: Path) -> Path:
    from optuna import visualization as vp

    fig = getattr(vp, fn_name)(study, **_kwargs(fn_name))
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)  # inlined: no CDN offline
    return path


def write_study_plots(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Writes <out_dir>/study_<plot>.{html,png} for the four plots; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    if not finished:
        log.warning("study %s: no finished trial, no study plots", study.study_name)
        return []
    written: list[Path] = []
    for name, fn_name in PLOTS.items():
        for writer, ext in ((_html, "html"), (_png, "png")):
            try:
                written.append(writer(study, fn_name, out / f"study_{name}.{ext}"))
            except Exception as exc:
                # The sweep itself is over: a plot that cannot be drawn must not lose its results.
                log.warning("study %s: %s.%s not drawn: %s", study.study_name, name, ext, exc)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m orchestration.study_plots STORAGE_URL STUDY_NAME OUT_DIR", file=sys.stderr)
        return 2
    storage, name, out = argv
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        print(f"error: no study {name!r} in {storage}", file=sys.stderr)
        return 2
    for path in write_study_plots(study, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
