"""One sweep trial as a Ray Tune function trainable: config, training, reports, checkpoints, MLflow.

`trial_main(config, settings, tracking)` builds the trial's training config (base + the job's overrides
+ the sampled parameters + the seed), resolves s3:// data roots and weights to a node-local cache, and
runs `s4mc.train.run_training` with two callbacks: a `TrialTracker` (MLflow) and a `RayReporter` that
calls `tune.report(metrics, checkpoint=...)` once per evaluation. The trainer writes its checkpoint
after `on_eval`, so the report happens in `on_checkpoint`: the reported Ray checkpoint then holds the
`last.pt` of the very step whose metrics it carries, and Ray copies it to the sweep's storage (local or
S3) inside the report. On a restart (a retried failure or a restored sweep) the Ray checkpoint is
copied back into the run folder and the trainer resumes exactly from `checkpoints/last.pt`; Ray's
checkpoint is the source of truth, so local files newer than it are dropped and Ray's iteration count
always equals the trainer's evaluation count.

Several `seeds` train in lockstep: each seed's run trains to its next evaluation and stops there
(`StopTraining` after the checkpoint), the trial reports the mean over seeds, and the next round
resumes every run from its checkpoint. ASHA stops a trial inside `tune.report` (docs/platform.md):
the MLflow run is closed in `finally`, and final artifacts are logged before the last report.

`resources_per_trial.gpu > 1` (or `workers > 1`) trains data-parallel: the trial drives a Ray Train
`TorchTrainer` with that many workers (one GPU each, or CPU workers on gloo); Ray Train sets up
torch.distributed and the trainer wraps its student in DDP (s4mc/train/loop.py). Rank 0 reports
metrics with the checkpoint, the other ranks metrics only; only rank 0 logs to MLflow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from orchestration.keys import NUMBER_KEY, PROGRESS_KEY, sampled_params, trial_key
from orchestration.manifest import Manifest, ResourcesConfig, dp_workers
from s4mc.config import as_layer, config_layers, flatten, load_config
from s4mc.train import StopTraining, run_training

CKPT_FILES = ("last.pt", "best.pt")
RUN_FILES = ("metrics.jsonl", "train.csv", "eval.csv")  # small; keep the run folder whole on another node


@dataclass(frozen=True)
class TrialSettings:
    """What a trial takes from its job: a sweep manifest (`of(manifest)`) or one cell x seed of a paper
    table (orchestration/reproduce.py). Picklable for Ray; the names are the sweep manifest's."""

    name: str  # trial keys are <name>-t<number> (orchestration/keys.py)
    base: str | None = None  # training config YAML
    overrides: dict[str, Any] = field(default_factory=dict)  # training-config keys (s4mc.config.as_layer)
    seeds: tuple[int, ...] = (0,)
    work_dir: str = "runs"
    storage: str = "."
    resources_per_trial: ResourcesConfig = field(default_factory=ResourcesConfig)
    retries: int = 2
    metric: str = "eval/mIoU"

    @classmethod
    def of(cls, m: Manifest) -> TrialSettings:
        return cls(m.name, m.base, dict(m.overrides), tuple(m.seeds), m.work_dir, m.storage, m.resources_per_trial,
                   m.retries, m.metric)


def _resolve_uris(cfg: DictConfig) -> None:
    # s4mc/ never imports boto3: object-store URIs become node-local paths here (orchestration/storage.py).
    keys = [k for k in ("data.root", "model.pretrained")
            if str(OmegaConf.select(cfg, k) or "").startswith("s3://")]
    if not keys:
        return
    from orchestration.storage import resolve_local

    cache = Path(os.environ.get("S4MC_CACHE", Path.home() / ".cache" / "s4mc"))
    for k in keys:
        OmegaConf.update(cfg, k, str(resolve_local(OmegaConf.select(cfg, k), cache)))


def build_trial_config(m: TrialSettings | Manifest, params: dict[str, Any], seed: int, run_dir: Path, name: str,
                       base_config: dict | None = None) -> DictConfig:
    """Base + manifest overrides + sampled parameters + seed + run folder, validated by the schema.

    base_config: the driver's resolved base + overrides (so worker nodes need not hold the YAML files);
    without it the base YAML is read here.
    """
    # Validated once, whole: the base may be a recipe that only the cell's keys complete (a data root).
    cfg = OmegaConf.create(base_config) if base_config is not None else config_layers(m.base, [m.overrides])
    threads = [] if "train.threads" in flatten(as_layer(m.overrides)) else [
        # One torch thread per reserved CPU: trials share the machine (docs/platform.md).
        {"train.threads": max(1, math.ceil(m.resources_per_trial.cpu))}]
    layers = [as_layer(layer) for layer in [params, *threads, {
        "train.seed": int(seed), "train.progress": False, "run.name": name, "run.dir": str(run_dir)}]]
    cfg = load_config(None, base=OmegaConf.merge(cfg, *layers))
    _resolve_uris(cfg)
    return cfg


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # checkpoints are large: no second copy on disk
    except OSError:
        shutil.copy2(src, dst)


def restore_runs(runs: dict[int, Path], get_checkpoint) -> None:
    """Puts the Ray checkpoint (if any) back into each seed's run folder; drops newer local files."""
    for run_dir in runs.values():
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    checkpoint = get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as src:
        for seed, run_dir in runs.items():
            saved = Path(src) / f"seed_{seed}"
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            for name in CKPT_FILES + RUN_FILES:
                if (saved / name).is_file():
                    dst = run_dir / "checkpoints" / name if name in CKPT_FILES else run_dir / name
                    shutil.copy2(saved / name, dst)


def write_trial_summary(runs: dict[int, Path], step: int, total: int, stopped_early: bool) -> dict[str, Any]:
    """summary.json in each seed's run folder for a run that Tune ends inside a report (the last one, or
    an ASHA stop), where the trainer never writes its own; returns the summary over the seeds' mean."""
    import csv

    per_step: dict[int, list[float]] = {}
    for run_dir in runs.values():
        path = run_dir / "eval.csv"
        rows = list(csv.DictReader(path.open())) if path.is_file() else []
        for row in rows:
            if row.get("eval/mIoU") not in (None, ""):
                per_step.setdefault(int(float(row["step"])), []).append(float(row["eval/mIoU"]))
    mean = {s: sum(v) / len(v) for s, v in per_step.items() if len(v) == len(runs)}
    best_step = max(mean, key=lambda s: (mean[s], -s)) if mean else -1
    summary = {"steps": step, "total_steps": total, "stopped_early": stopped_early,
               "best/eval/mIoU": mean.get(best_step, math.nan), "best/step": best_step,
               "written_by": "orchestration/trial.py (the run ended inside a Ray report)"}
    for run_dir in runs.values():
        if run_dir.is_dir() and not (run_dir / "summary.json").is_file():
            (run_dir / "summary.json").write_text(json.dumps({"run_dir": str(run_dir), **summary}, indent=2))
    return summary


class RayReporter:
    """Reports one row per evaluation to Tune, with a checkpoint of every seed's run folder."""

    def __init__(self, key: str, trial_dir: Path, runs: dict[int, Path], report_fn, checkpoint_cls,
                 tracker=None, rank: int = 0):
        self.key, self.trial_dir, self.runs, self.report_fn = key, trial_dir, runs, report_fn
        self.checkpoint_cls = checkpoint_cls
        self.tracker, self.rank = tracker, rank
        self.total, self.start_step, self.pending, self.checkpointed = 0, 0, None, None
        self.startup_s = math.nan
        self.last_step = 0
        self.segment_start = time.time()  # training time = report-free segments (orchestration/results.py)
        import ray

        # Outside Ray (a direct call) there is no node: do not let Ray probe the network for an address.
        self.node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else "local"

    # trainer callbacks (single seed). One report per evaluation once both its metrics and its checkpoint
    # exist; the order of on_eval / on_checkpoint is the trainer's business (s4mc/train/loop.py).
    def on_train_start(self, info: dict) -> None:
        self.total, self.start_step = int(info["total_steps"]), int(info["start_step"])
        self.startup_s = float(info.get("startup_s", math.nan))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.pending = (step, dict(metrics))
        if self.rank != 0:  # only rank 0 writes checkpoints (s4mc/train/loop.py): the others report now
            self.report(step, self.pending[1], with_checkpoint=False)
        elif self.checkpointed == step:
            self.report(step, self.pending[1])

    def on_checkpoint(self, step: int, path: Path, is_best: bool) -> None:
        self.checkpointed = step
        if self.pending is not None and self.pending[0] == step:
            self.report(step, self.pending[1])

    # ----------------------------------------------------------------------------------------
    def report(self, step: int, metrics: dict[str, float], with_checkpoint: bool = True) -> None:
        row = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        row.update({"trial/step": step, "trial/total_steps": self.total,
                    PROGRESS_KEY: step / max(self.total, 1), "trial/resumed_from": self.start_step,
                    "trial/startup_s": self.startup_s,
                    "trial/segment_start": self.segment_start, "trial/time": time.time(),
                    "trial/node_ip": self.node_ip, "trial/key": self.key})
        self.last_step = step
        if step >= self.total and self.tracker is not None:
            # ASHA / max_t may end the trial inside this report (docs/platform.md): the summary and the
            # artifacts first.
            self.tracker.log_summary(write_trial_summary(self.runs, step, self.total, stopped_early=False))
            self.tracker.finish("FINISHED")
        if not with_checkpoint:
            self.report_fn(row)
            self.segment_start = time.time()
            return
        staging = self.trial_dir / f".report-{step}"
        shutil.rmtree(staging, ignore_errors=True)
        for seed, run_dir in self.runs.items():
            for name in CKPT_FILES:
                if (run_dir / "checkpoints" / name).is_file():
                    _link_or_copy(run_dir / "checkpoints" / name, staging / f"seed_{seed}" / name)
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    _link_or_copy(run_dir / name, staging / f"seed_{seed}" / name)
        (staging / "trial.json").write_text(json.dumps({"step": step, "key": self.key}))
        try:
            self.report_fn(row, checkpoint=self.checkpoint_cls.from_directory(str(staging)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.segment_start = time.time()


class _Round:
    """Lockstep helper: records one seed's next evaluation and stops its run once it is checkpointed."""

    def __init__(self, forward=None):
        self.forward, self.step, self.metrics, self.info, self.checkpointed = forward, None, None, None, None

    def on_train_start(self, info):
        self.info = info

    def on_step(self, step, metrics):
        if self.forward is not None:
            self.forward.on_step(step, metrics)

    def on_eval(self, step, metrics):
        self.step, self.metrics = step, dict(metrics)
        self._stop_if_done()

    def on_checkpoint(self, step, path, is_best):
        self.checkpointed = step
        self._stop_if_done()

    def _stop_if_done(self):
        if self.step is not None and self.step == self.checkpointed:
            raise StopTraining


def _train_lockstep(cfgs: dict[int, DictConfig], runs: dict[int, Path], reporter: RayReporter,
                    tracker, metric: str = "eval/mIoU") -> None:
    first = True
    while True:
        rounds = {}
        for i, (seed, cfg) in enumerate(cfgs.items()):
            rounds[seed] = _Round(forward=tracker if i == 0 else None)
            run_training(cfg, runs[seed], callbacks=[rounds[seed]], resume=True)
        infos = [r.info for r in rounds.values()]
        if first:
            reporter.on_train_start(infos[0])
            if tracker is not None and hasattr(tracker, "on_train_start"):
                tracker.on_train_start(infos[0])
            first = False
        if any(r.step is None for r in rounds.values()):  # every run had already finished
            return
        step = next(iter(rounds.values())).step
        keys = set.intersection(*(set(r.metrics) for r in rounds.values()))
        mean = {k: sum(r.metrics[k] for r in rounds.values()) / len(rounds) for k in sorted(keys)}
        if tracker is not None and hasattr(tracker, "on_eval"):
            tracker.on_eval(step, mean)
        # Each seed's own score too: the sweep summary pairs trials by seed (orchestration/results.py).
        per_seed = {f"seed_{s}/{metric}": r.metrics[metric] for s, r in rounds.items() if metric in r.metrics}
        reporter.report(step, {**mean, **per_seed})
        if step >= reporter.total:
            return


class _Tracked:
    """The MLflow tracker as a trainer callback whose run may already be closed by the final report.

    RayReporter closes the run (artifacts included) before the last `tune.report`; if the trial lives on
    past it, the trainer's `on_train_end` then only adds the summary instead of uploading everything twice.
    """

    def __init__(self, tracker):
        self.tracker = tracker

    def __getattr__(self, hook):
        return getattr(self.tracker, hook)

    def on_train_end(self, summary):
        if not self.tracker.ended:
            self.tracker.on_train_end(summary)
            return
        self.tracker.log_summary(summary)
        path = Path(summary.get("run_dir", "")) / "summary.json"
        if path.is_file():
            self.tracker.client.log_artifact(self.tracker.run_id, str(path))


def _tracker(m: TrialSettings, tracking: dict | None, key: str, number: int, cfg: DictConfig,
             params: dict[str, Any]):
    if not tracking:
        return None
    from orchestration.tracking import PARAM_PREFIX
    from orchestration.trial_tracker import TrialTracker

    # A paper table's trial number is its seed, not an Optuna trial (orchestration/keys.py).
    number_tag = {"optuna_trial": number} if tracking.kind == "sweep" else {}
    tags = {"sweep_name": m.name, **number_tag, **{f"{PARAM_PREFIX}{k}": v for k, v in params.items()}}
    prefix = f"{m.storage.rstrip('/')}/best/{key}" if m.storage.startswith("s3://") else None
    return TrialTracker(tracking.uri, tracking.experiment_id, tracking.parent_run_id, key, key, cfg,
                        tags, checkpoint_prefix=prefix)


def run_trial(config: dict, m: TrialSettings, tracking: dict | None, report_fn, get_checkpoint, checkpoint_cls,
              rank: int = 0, callbacks: tuple = (), base_config: dict | None = None) -> None:
    """The body shared by the plain and the data-parallel trial: train every seed, report each eval.

    callbacks: extra trainer callbacks (single seed), e.g. a custom trainable's own instrumentation.
    """
    key = trial_key(m.name, config)
    params = sampled_params(config)
    trial_dir = Path(m.work_dir) / key
    # Ranks of one data-parallel trial may share a file system: only rank 0 writes its run folder, the
    # others keep their own copy of the checkpoint to resume from.
    suffix = f"-rank{rank}" if rank else ""
    runs = {s: trial_dir / f"seed_{s}{suffix}" for s in m.seeds}
    cfgs = {s: build_trial_config(m, params, s, runs[s], f"{key}-s{s}", base_config) for s in m.seeds}
    restore_runs(runs, get_checkpoint)
    tracker = _tracker(m, tracking, key, int(config[NUMBER_KEY]), cfgs[m.seeds[0]], params) if rank == 0 \
        else None
    reporter = RayReporter(key, trial_dir, runs, report_fn, checkpoint_cls, tracker, rank)
    status = "FAILED"
    try:
        if len(m.seeds) == 1:
            seed = m.seeds[0]
            cbs = ([_Tracked(tracker)] if tracker is not None else []) + [reporter, *callbacks]
            run_training(cfgs[seed], runs[seed], callbacks=cbs, resume=True)
        else:
            _train_lockstep(cfgs, runs, reporter, tracker, m.metric)
        status = "FINISHED"
    except SystemExit:  # Tune ends a stopped trial with sys.exit(0) inside report (ray/train session)
        status = "FINISHED"
        if tracker is not None and not tracker.ended:  # stopped early (ASHA): its summary says so
            tracker.log_summary(write_trial_summary(runs, reporter.last_step, reporter.total, stopped_early=True))
            tracker.set_tags({"stopped_early": "true"})
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)


def trial_main(config: dict, settings: TrialSettings, tracking=None, base_config: dict | None = None) -> None:
    """The Tune trainable (`tune.with_parameters(trial_main, settings=..., tracking=..., base_config=...)`)."""
    from ray import tune

    if dp_workers(settings.resources_per_trial) > 1:
        _data_parallel(config, settings, tracking, base_config)
        return
    run_trial(config, settings, tracking, tune.report, tune.get_checkpoint, tune.Checkpoint,
              base_config=base_config)


def _ddp_worker(loop_config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    run_trial(loop_config["config"], loop_config["settings"], loop_config["tracking"], ray.train.report,
              ray.train.get_checkpoint, ray.train.Checkpoint, rank, base_config=loop_config["base_config"])


def _data_parallel(config: dict, m: TrialSettings, tracking: dict | None, base_config: dict | None) -> None:
    # Ray Train V2 inside a Tune trial: the trial only drives the TorchTrainer; its workers hold the CPUs
    # and GPUs. TuneReportCallback forwards rank 0's reports to this trial, so ASHA sees them like any
    # other trial's. A restarted trial (retry, resumed sweep) calls fit() with the same run name and
    # storage, and Ray Train resumes from that run's latest checkpoint (ray.train.get_checkpoint()).
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestration.execution import worker_bundle
    from orchestration.storage import storage_filesystem

    r = m.resources_per_trial
    workers = dp_workers(r)
    fs, path = storage_filesystem(m.storage)
    per_worker = {k: v for k, v in worker_bundle(r).items() if v > 0}
    trainer = TorchTrainer(
        _ddp_worker, train_loop_config={"config": config, "settings": m, "tracking": tracking,
                                        "base_config": base_config},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=r.gpu > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"ddp-{trial_key(m.name, config)}", storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=m.retries), callbacks=[TuneReportCallback()]))
    trainer.fit()
