"""The Optuna side of a sweep: the define-by-run space, a seeded sampler, a persistent study.

`SearchSpace` turns the manifest's `search` list into an Optuna define-by-run function: parameters
are sampled in the listed order and a parameter with `when` is sampled only when the condition holds
on the value already drawn for its `when.key` (or, when that key is not searched or not active, on the
base config's value). The sampler is seeded with multivariate TPE and constant liar pinned off: Optuna
5 turns both on by default, and then suggestions depend on how many trials run at once
(docs/platform.md). The study lives in persistent storage (`optuna_storage`, SQLite by default)
under the sweep's name; the base config's values of the searched keys (the paper defaults of
s4mc/config.py unless the base overrides them; docs/method.md §3-4) are enqueued as trial 0.

Early stopping and the search. Ray's `OptunaSearch` tells Optuna that a trial stopped by ASHA is
COMPLETE with its low-budget score (docs/platform.md), which puts a score after 1/4 of the training
beside full-budget scores and can make `study.best_trial` a trial that never finished. We instead tell
such trials as PRUNED: Optuna's own state for "stopped by an early-stopping rule". Every evaluation
was already recorded as an intermediate value (`OptunaSearch.on_trial_result`), Optuna stores the last
one as the trial's value, and TPE ranks pruned trials below complete ones, by how far they got and
then by that value - the multi-fidelity treatment Optuna designed for its own pruners. The user attrs
`stopped_early`, `evaluations` and `last_score` make the choice visible; MLflow gets the same tags
from the sweep driver. A trial is "stopped early" when its last report came before the end of its
training schedule (`trial/progress` < 1).

Resuming. Ray restores this searcher from its own checkpoint, which can be up to one checkpoint
period older than the study: a trial asked for after that checkpoint is RUNNING in the study but
unknown to Ray. `restore` marks such orphans FAIL (user attr `orphaned`) and enqueues their parameters
again, so the configuration is still evaluated once and no trial is lost or counted twice.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from orchestration.keys import NUMBER_KEY, PROGRESS_KEY  # noqa: F401 (re-exported)
from orchestration.manifest import Manifest, ParamConfig, condition_holds

log = logging.getLogger(__name__)

SQLITE_TIMEOUT_S = 60  # concurrent driver + CLI readers of one SQLite file: wait, do not fail


class SearchSpace:
    """Define-by-run space (a class, not a closure: Ray pickles the searcher with plain pickle)."""

    def __init__(self, params: list[ParamConfig], base_values: dict[str, Any]):
        self.params = list(params)
        self.base_values = dict(base_values)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        drawn: dict[str, Any] = {}
        for p in self.params:
            if p.when is not None:
                ref = drawn.get(p.when.key, self.base_values.get(p.when.key))
                if not condition_holds(p.when, ref):
                    continue
            drawn[p.key] = suggest(trial, p)
        # Not a parameter: returned constants go into the Ray config beside the sampled values.
        return {NUMBER_KEY: trial.number}


def suggest(trial: optuna.Trial, p: ParamConfig) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1))
    if p.type == "loguniform":
        return trial.suggest_float(p.key, float(p.low), float(p.high), log=True)
    return trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step)


def _in_space(p: ParamConfig, value: Any) -> bool:
    if p.type == "categorical":
        return value in list(p.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high:
        return False
    if p.type == "int" and value != int(value):
        return False
    if p.step:
        k = (value - p.low) / p.step
        return math.isclose(k, round(k), abs_tol=1e-9)
    return True


def base_values(m: Manifest, base: DictConfig) -> dict[str, Any]:
    """The base config's value of every searched key and every `when` key."""
    keys = {p.key for p in m.search} | {p.when.key for p in m.search if p.when is not None}
    return {k: OmegaConf.select(base, k) for k in sorted(keys)}


def default_point(m: Manifest, base: DictConfig) -> dict[str, Any]:
    """The base config's values of the searched keys that are active and inside the space."""
    values, point = base_values(m, base), {}
    for p in m.search:
        if p.when is not None and not condition_holds(p.when, point.get(p.when.key, values[p.when.key])):
            continue
        if _in_space(p, values[p.key]):
            point[p.key] = values[p.key]
        else:
            log.warning("default point: %s=%r lies outside the searched space; it is sampled instead",
                        p.key, values[p.key])
    return point


def build_sampler(m: Manifest) -> optuna.samplers.BaseSampler:
    s = m.sampler
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials,
                                      multivariate=s.multivariate, constant_liar=s.constant_liar)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def open_study(m: Manifest, create: bool = True) -> optuna.Study:
    storage = open_storage(m.optuna_storage)
    if not create:
        return optuna.load_study(study_name=m.name, storage=storage)
    return optuna.create_study(storage=storage, study_name=m.name, load_if_exists=True,
                               direction="maximize" if m.mode == "max" else "minimize",
                               sampler=build_sampler(m))


def study_exists(m: Manifest) -> bool:
    storage = open_storage(m.optuna_storage)
    return any(s.study_name == m.name for s in storage.get_all_studies())


def build_searcher(m: Manifest, base: DictConfig) -> SweepSearch:
    """The Tune searcher over a persistent study; the default point is enqueued once, on creation."""
    study = open_study(m)
    if m.evaluate_default_first and not study.trials:
        study.enqueue_trial(default_point(m, base), user_attrs={"default": True})
    return SweepSearch(space=SearchSpace(m.search, base_values(m, base)), metric=m.metric, mode=m.mode,
                       sampler=build_sampler(m), study_name=m.name, storage=open_storage(m.optuna_storage))


class SweepSearch(OptunaSearch):
    """OptunaSearch that tells early-stopped trials as PRUNED and repairs orphans on restore."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        value = (result or {}).get(self.metric)
        stopped = (not error and value is not None and ot_trial is not None
                   and float(result.get(PROGRESS_KEY, 1.0)) < 1.0)
        if not stopped or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        iteration = int(result.get("training_iteration", 0))
        ot_trial.set_user_attr("stopped_early", True)
        ot_trial.set_user_attr("evaluations", iteration)
        ot_trial.set_user_attr("last_score", float(value))
        if iteration not in self._ot_study._storage.get_trial(ot_trial._trial_id).intermediate_values:
            ot_trial.report(float(value), iteration)
        try:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception as exc:  # e.g. told before a driver restart; keep the sweep going
            log.warning("optuna tell for %s failed: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {t.number for t in self._ot_trials.values()}
        for ft in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if ft.number in known:
                continue
            attrs = {k: v for k, v in ft.user_attrs.items() if k != "ray_trial_id"}
            self._ot_study.enqueue_trial(ft.params, user_attrs={**attrs, "requeued_from": ft.number})
            storage, tid = self._ot_study._storage, ft._trial_id
            storage.set_trial_user_attr(tid, "orphaned", True)
            storage.set_trial_state_values(tid, TrialState.FAIL)
            log.warning("optuna trial %d was asked for after Ray's last checkpoint; marked FAIL and its "
                        "parameters enqueued again", ft.number)
