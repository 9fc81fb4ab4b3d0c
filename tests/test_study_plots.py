"""orchestration/study_plots.py: the four Optuna analysis views of a small in-memory study, as HTML and PNG."""

from __future__ import annotations

import optuna
from PIL import Image

from orchestration.study_plots import PLOTS, write_study_plots


def _study(n: int = 6) -> optuna.Study:
    """A seeded study shaped like a sweep's: a conditional parameter, intermediate values, one pruned trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        hood = trial.suggest_categorical("s4mc.neighbourhood", ["4", "3x3"])
        alpha = trial.suggest_float("s4mc.alpha0", 0.2, 0.6)
        if hood != "4":
            trial.suggest_categorical("s4mc.beta", ["one", "decay"])
        for step in (1, 2, 3):
            trial.report(50 + 10 * alpha + step, step)
        if trial.number == 2:
            raise optuna.TrialPruned
        return 53 + 10 * alpha

    study.optimize(objective, n_trials=n)
    return study


def test_writes_four_plots_as_html_and_png(tmp_path):
    files = write_study_plots(_study(), tmp_path / "sweep")
    assert sorted(p.name for p in files) == sorted(f"study_{name}.{ext}" for name in PLOTS for ext in ("html", "png"))
    for path in files:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            with Image.open(path) as img:
                assert img.width >= 600 and img.height >= 300
        else:
            text = path.read_text()
            assert "Plotly.newPlot" in text and "<script src=\"http" not in text  # plotly.js inlined: works offline


def test_one_trial_still_draws_and_no_finished_trial_draws_nothing(tmp_path):
    assert len(write_study_plots(_study(1), tmp_path / "one")) == 8
    failed = optuna.create_study()
    failed.optimize(lambda t: float("nan"), n_trials=1)  # a NaN objective: the trial is FAIL
    assert write_study_plots(failed, tmp_path / "none") == []
    assert write_study_plots(optuna.create_study(), tmp_path / "empty") == []
