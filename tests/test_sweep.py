"""Sweep machinery: manifest schema, Optuna search, Ray trials, resume, retries, a two-node cluster.

The fast tests check the manifest schema and the searcher without any service. The `services` tests
run real sweeps (real trainer on a tiny budget, real Ray, Optuna on SQLite, MLflow on SQLite) on the
session's two-node loopback Ray cluster (tests/conftest.py, section 3): one 4-trial ASHA sweep in
which the first trial to pass its first evaluation is SIGKILLed once and retried from its checkpoint,
and one sweep interrupted with Ctrl-C (SIGINT) in a `s4mc-sweep` subprocess on its own local Ray, then
resumed here.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestration.manifest import load_manifest
from s4mc.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "embedded" / "cutmix_seg_s4mc.yaml"
# A few seconds per trial on 2 cores (measured: ~1.6 s of steps, ~2 s to build data and model).
TINY = ["train.steps=6", "train.eval_every=3", "train.log_every=1", "data.embedded.num_train=64",
        "data.embedded.num_val=16", "data.embedded.image_size=32", "data.crop_size=32", "model.width=0.25",
        "eval.batch_size=16",
        # cutmix_seg_s4mc.yaml inherits the digit-pretrained encoder and a 300-step warm-up (_base.yaml):
        # a 6-step trial from scratch with no warm-up keeps every step semi-supervised and skips pretraining.
        "model.pretrained=null", "train.sup_only_steps=0"]
SPACE = [{"key": "s4mc.neighbourhood", "type": "categorical", "choices": ["4", "3x3", "5x5"]},
         {"key": "s4mc.beta", "type": "categorical", "choices": ["one", "decay"],
          "when": {"key": "s4mc.neighbourhood", "not_equals": "4"}},
         {"key": "s4mc.alpha0", "type": "float", "low": 0.2, "high": 0.6}]
NODE_IPS = {"127.0.0.2", "127.0.0.3"}  # tests/conftest.py, section 3
LOCAL_RAY_TEMP = f"/tmp/ray-s4mc-{os.getpid()}l"  # the interrupted driver's own local Ray (per session)


def write_manifest(tmp_path: Path, name: str, tracking_uri: str | None = None, **keys) -> Path:
    doc = {"name": name, "base": str(BASE), "overrides": TINY, "search": SPACE, "num_trials": 4,
           "max_concurrent": 2, "sampler": {"seed": 0, "n_startup_trials": 2},
           "storage": str(tmp_path / "store"), "work_dir": str(tmp_path / "work"),
           "tracking": {"uri": tracking_uri or f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"}, **keys}
    doc["overrides"] = as_mapping(doc["overrides"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def as_mapping(overrides) -> dict:
    """key=value strings (the command-line form) as the manifest's `overrides` mapping."""
    if isinstance(overrides, dict):
        return overrides
    return {key: yaml.safe_load(value) for key, _, value in (o.partition("=") for o in overrides)}


# --------------------------------------------------------------------------------------------------
# Manifest schema and search (no services)
# --------------------------------------------------------------------------------------------------
def test_manifest_defaults_resolve_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "d", "project": str(tmp_path), "search": SPACE}))
    m = load_manifest(path)
    assert m.storage == str(tmp_path / "sweeps" / "d")
    assert m.optuna_storage == f"sqlite:///{tmp_path / 'sweeps' / 'd' / 'optuna.db'}"
    assert m.tracking.uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}" and m.tracking.experiment == "d"
    assert m.ray.address is None and m.sampler.multivariate is False and m.sampler.constant_liar is False
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6379")
    m = load_manifest(path, ["num_trials=3"])
    assert (m.tracking.uri, m.ray.address, m.num_trials) == ("http://127.0.0.1:5999", "127.0.0.2:6379", 3)


@pytest.mark.parametrize("override, message", [
    ("colour=red", "key 'colour' is not a manifest key"),
    ("num_trials=many", "num_trials"),
    ("search.0.key=s4mc.nope", "search[0] (s4mc.nope): key 's4mc.nope' is not a training-config key"),
    ("search.0.type=normal", "type='normal' is not allowed"),
    ("search.0.choices=[4,9x9]", "value '9x9' gives an invalid training config"),
    ("search.2.high=1.5", "s4mc.alpha0=1.5 is out of range"),
    ("search.2.low=0.7", "needs low < high"),
    ("search.1.when.key=s4mc.alpha0", "is searched below this parameter"),
    ("search.0.key=train.seed", "cannot be searched"),
    ("scheduler.name=hyperband", "scheduler.name='hyperband' is not allowed"),
    ("resources_per_trial.gpu=1.5", "must be whole"),
    ("metric=mIoU", "is not a trainer metric"),
    ("overrides.s4mc.k=99", "s4mc.k=99 is out of range"),
    ("base=missing.yaml", "the training config file does not exist"),
    ("ray.temp_dir=/tmp/a-very-long-temporary-directory-name-for-ray", "too long"),
])
def test_manifest_errors_name_the_key(tmp_path, override, message):
    path = write_manifest(tmp_path, "bad")
    with pytest.raises(ConfigError, match=None) as info:
        load_manifest(path, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from orchestration.cli import main

    assert main(["run", "--manifest", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["run", "--manifest", str(write_manifest(tmp_path, "x")), "search.0.type=normal"]) == 2
    assert "search[0]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_space_is_conditional_and_starts_with_the_default(tmp_path):
    import optuna

    from orchestration.manifest import base_training_config
    from orchestration.search import NUMBER_KEY, SearchSpace, base_values, build_searcher, default_point

    m = load_manifest(write_manifest(tmp_path, "space"), [f"optuna_storage=sqlite:///{tmp_path}/o.db"])
    base = base_training_config(m)
    assert default_point(m, base) == {"s4mc.neighbourhood": "3x3", "s4mc.beta": "one", "s4mc.alpha0": 0.4}
    searcher = build_searcher(m, base)
    first = searcher.suggest("ray-0")
    assert first == {**default_point(m, base), NUMBER_KEY: 0}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    space = SearchSpace(m.search, base_values(m, base))
    for _ in range(30):
        trial = study.ask()
        drawn = space(trial)
        assert drawn == {NUMBER_KEY: trial.number}
        assert ("s4mc.beta" in trial.params) == (trial.params["s4mc.neighbourhood"] != "4")
        study.tell(trial, 0.0)


def _searcher(tmp_path, name):
    from orchestration.manifest import base_training_config
    from orchestration.search import build_searcher, open_study

    m = load_manifest(write_manifest(tmp_path, name), [f"optuna_storage=sqlite:///{tmp_path}/o.db"])
    return build_searcher(m, base_training_config(m)), lambda: open_study(m, create=False)


def test_early_stopped_trials_are_told_pruned(tmp_path):
    searcher, study = _searcher(tmp_path, "prune")
    for rid in ("a", "b"):
        searcher.suggest(rid)
        searcher.on_trial_result(rid, {"eval/mIoU": 10.0, "training_iteration": 1})
    searcher.on_trial_result("a", {"eval/mIoU": 30.0, "training_iteration": 2})
    searcher.on_trial_complete("a", {"eval/mIoU": 30.0, "training_iteration": 2, "trial/progress": 1.0})
    searcher.on_trial_complete("b", {"eval/mIoU": 10.0, "training_iteration": 1, "trial/progress": 0.5})
    a, b = study().trials
    assert (a.state.name, a.value) == ("COMPLETE", 30.0)
    assert (b.state.name, b.value, b.user_attrs["stopped_early"], b.user_attrs["evaluations"]) == \
        ("PRUNED", 10.0, True, 1)
    assert study().best_trial.number == a.number


def test_restore_requeues_a_trial_asked_after_the_last_checkpoint(tmp_path):
    searcher, study = _searcher(tmp_path, "orphan")
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Ray's periodic searcher checkpoint
    orphan = searcher.suggest("b")  # asked for, then the driver dies before the next checkpoint
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = {t.number: t.state.name for t in study().trials}
    assert states[1] == "FAIL" and study().trials[1].user_attrs["orphaned"]
    again = restored.suggest("c")
    assert {k: v for k, v in again.items() if k != "optuna_trial"} == \
        {k: v for k, v in orphan.items() if k != "optuna_trial"}
    assert study().trials[again["optuna_trial"]].user_attrs["requeued_from"] == 1


def test_overhead_is_the_share_of_wall_time_with_no_trial_training():
    from orchestration.results import summarise

    rows = [{"segments": [(10.0, 20.0), (22.0, 30.0)], "startup_s": 3.0}, {"segments": [(15.0, 25.0)],
                                                                          "startup_s": None}]
    t = summarise(rows, [[0.0, 40.0]], concurrency=2)
    assert t["wall_s"] == 40.0 and t["train_sum_s"] == 28.0 and t["train_busy_s"] == 20.0
    assert t["overhead_fraction"] == pytest.approx(0.5) and t["slot_utilisation"] == pytest.approx(28 / 80)
    assert t["startup_sum_s"] == 3.0 and t["startup_max_s"] == 3.0  # a trial without the figure is left out


# --------------------------------------------------------------------------------------------------
# Real sweeps (services)
# --------------------------------------------------------------------------------------------------
def killing_trial(config, settings, tracking, base_config=None):
    """trial_main plus a callback that SIGKILLs the worker after step 4 of the first trial to get there
    (it passed ASHA's only rung, at evaluation 1 of 2), once: Ray must retry it from the step-3 checkpoint."""
    from ray import tune

    from orchestration.trial import run_trial

    marker = Path(settings.work_dir) / "killed"

    class KillOnce:
        def on_step(self, step, metrics):
            if step == 4:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
                marker.write_text(f"optuna_trial={config['optuna_trial']}")
                os.kill(os.getpid(), signal.SIGKILL)

    run_trial(config, settings, tracking, tune.report, tune.get_checkpoint, tune.Checkpoint,
              callbacks=(KillOnce(),), base_config=base_config)


@pytest.fixture(scope="module")
def tiny_sweep(ray_cluster, tmp_path_factory, mlflow_db_copy):
    from ray import cloudpickle

    from orchestration.sweep import run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    tmp = tmp_path_factory.mktemp("sweep")
    uri = mlflow_db_copy(tmp / "mlruns" / "mlflow.db")
    path = write_manifest(tmp, "tiny", tracking_uri=uri, retries=2,
                          scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 2},
                          ray={"address": ray_cluster})
    m = load_manifest(path)
    lines: list[str] = []
    t0 = time.time()
    result = run_sweep(m, manifest_path=str(path), trainable=killing_trial, echo=lines.append)
    return m, result, "\n".join(lines), time.time() - t0


def _mlflow_children(m, parent_run_id):
    from mlflow import MlflowClient

    client = MlflowClient(m.tracking.uri)
    exp = client.get_experiment_by_name(m.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return client, [r for r in runs if r.data.tags.get("orphaned") != "true"]


@pytest.mark.services
def test_sweep_tracks_every_trial_in_mlflow_and_optuna(tiny_sweep):
    from orchestration.manifest import base_training_config
    from orchestration.search import default_point, open_study

    m, result, out, _ = tiny_sweep
    assert not result.interrupted and not result.errors
    keys = {row["trial"] for row in result.rows}
    assert len(result.rows) == 4 and keys == {f"tiny-t00{i}" for i in range(4)}
    client, children = _mlflow_children(m, result.parent_run_id)
    assert sorted(r.data.tags["trial_key"] for r in children) == sorted(keys)
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:
        pl = client.get_metric_history(run.info.run_id, "pl/quantity")
        evals = [x.step for x in client.get_metric_history(run.info.run_id, "eval/mIoU")]
        assert len({x.step for x in pl}) >= 2 and evals in ([3], [3, 6])
        assert run.data.tags["optuna_state"] in ("COMPLETE", "PRUNED")
    assert max(len(client.get_metric_history(r.info.run_id, "eval/mIoU")) for r in children) == 2
    trials = open_study(m, create=False).trials
    assert len(trials) == 4 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert trials[0].user_attrs["default"] and trials[0].params == default_point(m, base_training_config(m))
    for name in ("results.csv", "results.md", "summary.json"):
        assert (result.sweep_dir / name).is_file()
    summary = json.loads((result.sweep_dir / "summary.json").read_text())
    assert 0.0 <= summary["timing"]["overhead_fraction"] < 1.0 and summary["timing"]["train_busy_s"] > 0
    assert 0.0 < summary["timing"]["startup_max_s"] <= summary["timing"]["startup_sum_s"]
    assert "best configuration: tiny-t" in out and "make ui MANIFEST=" in out and "| pl/quality |" in out
    # The four study plots (orchestration/study_plots.py), in the folder and on the parent run.
    plots = {f"study_{n}.{e}" for n in ("parallel_coordinate", "param_importances", "intermediate_values",
                                        "optimization_history") for e in ("html", "png")}
    assert plots <= {p.name for p in result.sweep_dir.iterdir()}
    assert plots <= {a.path for a in client.list_artifacts(result.parent_run_id)}
    # Each trial's best checkpoint is an MLflow 3 logged model of its run, with the run's metrics.
    models = client.search_logged_models([children[0].info.experiment_id])
    assert {x.source_run_id for x in models} == {r.info.run_id for r in children}
    assert all(str(x.status) == "READY" and any(k.key == "eval/mIoU" for k in x.metrics) for x in models)


@pytest.mark.services
def test_killed_trial_resumes_from_its_checkpoint_with_identical_results(tiny_sweep, tmp_path):
    from orchestration.trial import build_trial_config
    from s4mc.train import run_training

    m, result, _, _ = tiny_sweep
    marker = Path(m.work_dir) / "killed"
    number = int(marker.read_text().split("=")[1])
    row = next(r for r in result.rows if r["optuna_trial"] == number)
    assert row["state"] == "COMPLETE" and row["evaluations"] == 2 and row["resumed_from"] == 3
    cfg = build_trial_config(m, row["params"], m.seeds[0], tmp_path / "run", "uninterrupted")
    final = run_training(cfg, tmp_path / "run", resume=False)["final"]
    for key in ("eval/mIoU", "pl/quantity", "pl/quality", "pl/quantity_no_refine", "pl/quality_no_refine"):
        assert row[key] == pytest.approx(final[key], rel=1e-6, abs=1e-9), key
    client, children = _mlflow_children(m, result.parent_run_id)
    run = next(r for r in children if r.data.tags["trial_key"] == row["trial"])
    assert [x.step for x in client.get_metric_history(run.info.run_id, "eval/mIoU")] == [3, 6]


@pytest.mark.services
def test_trials_ran_on_both_nodes_of_the_two_node_cluster(tiny_sweep):
    _, result, _, _ = tiny_sweep
    # Two trials start together and each node has one CPU: they must land on different nodes.
    assert {ip for row in result.rows for ip in row["node_ips"]} == NODE_IPS


def interrupt_after(proc: subprocess.Popen, marker: str, exit_codes: tuple[int, ...], timeout: float) -> str:
    """Ctrl-C a running `s4mc-sweep run` once its console shows `marker`; its whole output once it
    has exited with one of `exit_codes` (130: interrupted)."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and returns
            break
        assert time.monotonic() < deadline, "".join(lines[-30:])
    lines.extend(proc.stdout)
    assert proc.wait(timeout=120) in exit_codes, "".join(lines[-40:])
    return "".join(lines)


@pytest.mark.services
def test_interrupted_sweep_resumes_without_losing_or_repeating_trials(ray_cluster, tmp_path, mlflow_db_copy, s3,
                                                                     s3_bucket):
    """Ctrl-C a `s4mc-sweep run` (own local Ray) mid-sweep, resume it on the two-node cluster. Storage
    is S3 (moto): Ray's experiment state and checkpoints go through pyarrow with the endpoint override."""
    from conftest import stop_ray_processes

    from orchestration.manifest import sweep_dir_of
    from orchestration.search import open_study
    from orchestration.sweep import run_sweep

    uri = mlflow_db_copy(tmp_path / "mlruns" / "mlflow.db")
    overrides = [o for o in TINY if not o.startswith("train.steps")] + ["train.steps=12"]  # 4 evaluations
    path = write_manifest(tmp_path, "resume", tracking_uri=uri, overrides=overrides, project=str(tmp_path),
                          storage=f"s3://{s3_bucket}/sweeps/resume", scheduler={"name": "fifo"},
                          ray={"num_cpus": 2, "temp_dir": LOCAL_RAY_TEMP})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "run", "--manifest", str(path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        interrupt_after(proc, "1/4 done", exit_codes=(130,), timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_ray_processes([LOCAL_RAY_TEMP])
    m = load_manifest(path, [f"ray.address={ray_cluster}"])
    first = json.loads((Path(sweep_dir_of(m)) / "summary.json").read_text())
    assert first["status"] == "interrupted" and first["states"].get("COMPLETE", 0) < 4
    result = run_sweep(m, resume=True, echo=lambda *_: None)

    assert not result.interrupted and len(result.rows) == 4
    assert {r["state"] for r in result.rows} == {"COMPLETE"}
    trials = open_study(m, create=False).trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len({t.user_attrs["ray_trial_id"] for t in done}) == 4
    assert all(t.user_attrs.get("orphaned") for t in trials if t.state.name == "FAIL")
    assert {r["optuna_trial"] for r in result.rows} == {t.number for t in done}
    client, children = _mlflow_children(m, result.parent_run_id)
    assert sorted(r.data.tags["trial_key"] for r in children) == sorted(r["trial"] for r in result.rows)
    for run in children:  # each evaluation logged exactly once across both driver sessions
        assert [x.step for x in client.get_metric_history(run.info.run_id, "eval/mIoU")] == [3, 6, 9, 12]
    assert json.loads((Path(sweep_dir_of(m)) / "sweep_state.json").read_text())["parent_run_id"] == \
        result.parent_run_id and result.timing["sessions"] == 2
    stored = {o.key for o in s3.list_objects(f"s3://{s3_bucket}/sweeps/resume/")}
    assert any(k.endswith("/checkpoint_000003/seed_0/last.pt") for k in stored), sorted(stored)[:20]
    assert any("best/resume-t000/best.pt" in k for k in stored)


def test_several_seeds_train_in_lockstep_and_report_their_mean(tmp_path):
    """run_trial without Ray: two seeds, one report per evaluation round with the mean and both checkpoints."""
    import csv

    from orchestration.trial import run_trial

    m = load_manifest(write_manifest(tmp_path, "seeds"), ["seeds=[0,1]"])
    reports = []

    class FakeCheckpoint:
        @staticmethod
        def from_directory(path):
            return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*.pt"))

    run_trial({"optuna_trial": 0, "s4mc.alpha0": 0.4}, m, None,
              lambda row, checkpoint=None: reports.append((row, checkpoint)), lambda: None, FakeCheckpoint)
    assert [row["trial/step"] for row, _ in reports] == [3, 6]
    assert reports[-1][0]["trial/progress"] == 1.0
    assert reports[0][1] == ["seed_0/best.pt", "seed_0/last.pt", "seed_1/best.pt", "seed_1/last.pt"]
    per_seed = []
    for seed in (0, 1):
        with open(Path(m.work_dir) / "seeds-t000" / f"seed_{seed}" / "eval.csv") as f:
            per_seed.append([float(r["eval/mIoU"]) for r in csv.DictReader(f)])
    assert [row["eval/mIoU"] for row, _ in reports] == pytest.approx(
        [(a + b) / 2 for a, b in zip(*per_seed, strict=True)])
    # every seed's own score too, for the summary's paired comparison (orchestration/results.py)
    for s in (0, 1):
        assert [row[f"seed_{s}/eval/mIoU"] for row, _ in reports] == pytest.approx(per_seed[s])


@pytest.mark.services
@pytest.mark.slow
def test_data_parallel_trial_spans_both_nodes(ray_cluster, tmp_path, mlflow_db_copy):
    """workers: 2 -> a Ray Train TorchTrainer inside the Tune trial, one gloo worker per node; rank 0's
    reports (with checkpoints in Ray Train's storage) reach Tune, MLflow and the summary."""
    from orchestration.sweep import run_sweep

    uri = mlflow_db_copy(tmp_path / "mlruns" / "mlflow.db")
    # 0.1 CPU for the trial + 2 x 0.9 for its workers fits the cluster's 1 + 1 CPUs.
    path = write_manifest(tmp_path, "ddp", tracking_uri=uri, num_trials=1, max_concurrent=1,
                          resources_per_trial={"cpu": 1.8, "workers": 2}, scheduler={"name": "fifo"},
                          ray={"address": ray_cluster})
    m = load_manifest(path)
    result = run_sweep(m, echo=lambda *_: None)
    (row,) = result.rows
    assert row["state"] == "COMPLETE" and row["evaluations"] == 2 and not result.errors
    # Only rank 0 writes the run folder (s4mc/train/loop.py); rank 1 keeps a folder only to resume from.
    assert (Path(m.work_dir) / "ddp-t000" / "seed_0" / "eval.csv").is_file()
    assert not (Path(m.work_dir) / "ddp-t000" / "seed_0-rank1" / "eval.csv").exists()
    assert list((Path(m.storage) / "ddp-ddp-t000").glob("checkpoint_*/seed_0/last.pt"))
    client, children = _mlflow_children(m, result.parent_run_id)
    assert [x.step for x in client.get_metric_history(children[0].info.run_id, "eval/mIoU")] == [3, 6]
