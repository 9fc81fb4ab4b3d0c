"""The one execution layer under sweeps and paper tables: a trial plan in, Ray Tune's result grid out.

Both jobs (orchestration/sweep.py: Optuna-searched trials; orchestration/reproduce.py: a grid of
cell x seed trials) describe their trials as a `TrialPlan` and call `run_plan`, so there is one Tuner
builder, one rule for what a trial reserves (`trial_resources`), one progress display (`Progress`) and
one set of checks made before Ray is asked for anything (`preflight`): a Ray address that answers, a
remote cluster that can reach the storage and the tracking store, and a trial that fits on some node.
Each failure is one line naming the setting and what is allowed (docs/sweeps.md, "Errors"), raised
before a trial starts, so nothing already done is touched.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from ray.tune import Callback

from orchestration.keys import KEY_KEY, PROGRESS_KEY, error_line  # noqa: F401 (re-exported)
from orchestration.manifest import RayManifestConfig, ResourcesConfig, dp_workers
from orchestration.storage import storage_filesystem
from s4mc.config import ConfigError

EXPERIMENT_DIR = "tune"  # Ray's experiment folder inside the job's storage
DRIVER_CPU = 0.1  # a data-parallel trial's own share: it only waits on its TorchTrainer's workers
CONNECT_TIMEOUT_S = 5.0  # a Ray head or MLflow server that does not answer in 5 s is not there
PROGRESS_EVERY_S = 30.0  # one progress line at least this often while trials run
SHOWN_RUNNING = 6  # running trials listed by name on a progress line


class ExecutionError(ConfigError):
    """The trials cannot run as configured (unreachable address, no node fits a trial, ...)."""


def trial_resources(r: ResourcesConfig) -> dict[str, float]:
    """What one Ray trial reserves. A data-parallel trial (workers > 1) only drives a Ray Train
    TorchTrainer whose workers hold the CPUs and GPUs (orchestration/trial.py); Ray rejects an all-zero
    bundle, hence a token CPU share for the driver."""
    return {"cpu": r.cpu, "gpu": r.gpu} if dp_workers(r) == 1 else {"cpu": DRIVER_CPU}


def worker_bundle(r: ResourcesConfig) -> dict[str, float]:
    """What each process that trains reserves: the trial itself, or each of its data-parallel workers."""
    workers = dp_workers(r)
    if workers == 1:
        return {"CPU": r.cpu, "GPU": r.gpu}
    return {"CPU": max(r.cpu / workers, DRIVER_CPU), "GPU": r.gpu / workers}


def experiment_location(storage: str) -> tuple[Any, str, str]:
    """(pyarrow filesystem or None, Ray's path beside it, the path as the user sees it)."""
    fs, path = storage_filesystem(storage)
    return fs, f"{path.rstrip('/')}/{EXPERIMENT_DIR}", f"{storage.rstrip('/')}/{EXPERIMENT_DIR}"


def can_restore(storage: str) -> bool:
    from ray import tune

    fs, path, _ = experiment_location(storage)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


# -- checks before Ray starts ------------------------------------------------------------------------
def _address_source(address: str) -> str:
    return "env RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") == address else "ray.address"


def _host_port(address: str, default_port: int) -> tuple[str, int] | None:
    if address in ("auto", "local"):
        return None  # Ray finds (or starts) the cluster on this machine itself
    url = urlparse(address if "://" in address else f"tcp://{address}")
    return (url.hostname or "127.0.0.1", url.port or default_port)


def check_reachable(what: str, host: str, port: int, setting: str, value: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as exc:
        raise ExecutionError(f"{setting}={value!r}: {what} at {host}:{port} does not answer "
                             f"({type(exc).__name__}: {exc}); start it or fix {setting}") from None


def check_tracking_reachable(uri: str) -> None:
    """An http(s) MLflow server must answer before any trial starts (its client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    url = urlparse(uri)
    source = "env MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "tracking.uri"
    shown = uri.replace(f"{url.username}:{url.password}@", "***@") if url.password else uri
    check_reachable("the MLflow tracking server", url.hostname or "127.0.0.1",
                    url.port or (443 if url.scheme == "https" else 80), source, shown)


def _cluster_hosts() -> set[str]:
    import ray

    return {str(n.get("NodeManagerAddress")) for n in ray.nodes() if n.get("Alive")}


def check_remote_reach(address: str | None, storage: str, tracking_uri: str) -> None:
    """On a cluster of several machines every node writes checkpoints and metrics: a local folder or a
    local SQLite file on the driver's machine is not shared with the other nodes (docs/sweeps.md). Call
    after `init_ray`; nodes that all live on loopback (one machine) share its file system."""
    hosts = _cluster_hosts()
    if not address or all(h.startswith("127.") or h == "localhost" for h in hosts) or len(hosts) <= 1:
        return
    where = f"{_address_source(address)}={address!r} is a cluster of {len(hosts)} machines"
    if not storage.startswith("s3://") and not os.environ.get("S4MC_SHARED_STORAGE"):
        raise ExecutionError(f"storage={storage!r} is a local folder but {where}: use an s3:// storage (or set "
                             "S4MC_SHARED_STORAGE=1 if that folder is on a file system every node mounts)")
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        raise ExecutionError(f"tracking.uri={tracking_uri!r} is a local store but {where}: run an MLflow server "
                             "and set tracking.uri (or MLFLOW_TRACKING_URI) to it")


def check_fits(r: ResourcesConfig, setting: str = "resources_per_trial", autoscaling: bool = False) -> None:
    """Fails at once when no node of the running cluster can hold one training process of a trial
    (Ray would otherwise keep the trial PENDING forever)."""
    import ray

    need = worker_bundle(r)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(res.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0) for res in nodes) or autoscaling:
        return
    have = "; ".join(f"node {i}: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU" for i, res in
                     enumerate(nodes)) or "no live node"
    key = "gpu" if need.get("GPU", 0) > max((res.get("GPU", 0.0) for res in nodes), default=0.0) else "cpu"
    raise ExecutionError(f"{setting}.{key}={getattr(r, key):g} does not fit on any node of the cluster "
                         f"({have}); lower {setting}.{key} or add a node that has it")


def init_ray(ray_cfg: RayManifestConfig) -> None:
    """Joins `ray_cfg.address` (checked to answer first) or starts a local Ray on loopback."""
    import ray

    from orchestration.env import apply_env
    from orchestration.secrets import keep_credentials_out_of_ray

    apply_env(local_ray=not ray_cfg.address)  # the CLI did this before importing Ray; again for library use
    keep_credentials_out_of_ray()  # before any Tuner registers a trainable (orchestration/secrets.py)
    if ray.is_initialized():
        return
    if ray_cfg.address:
        if (hp := _host_port(ray_cfg.address.removeprefix("ray://"), 6379)) is not None:
            check_reachable("the Ray head", *hp, _address_source(ray_cfg.address), ray_cfg.address)
        ray.init(address=ray_cfg.address, log_to_driver=False)
        return
    ray.init(num_cpus=ray_cfg.num_cpus or os.cpu_count(), object_store_memory=ray_cfg.object_store_mb * 2**20,
             _temp_dir=ray_cfg.temp_dir, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")


def check_object_store(uris: dict[str, str]) -> None:
    """Each s3:// setting (storage, data.root, model.pretrained) needs credentials and an endpoint that
    answers: checked here in seconds instead of failing every trial after its retries."""
    s3 = {k: v for k, v in uris.items() if str(v or "").startswith("s3://")}
    if not s3:
        return
    from orchestration.storage import CREDENTIAL_SOURCES, S3Storage, StorageError, have_credentials, parse_s3_uri

    setting, uri = next(iter(s3.items()))
    if not have_credentials():
        raise ExecutionError(f"{setting}={uri!r}: no AWS credentials found for it; consulted {CREDENTIAL_SOURCES}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    url = urlparse(endpoint or "https://s3.amazonaws.com")
    for setting, uri in s3.items():
        try:
            check_reachable("the S3 endpoint", url.hostname or "", url.port or (443 if url.scheme == "https" else 80),
                            setting, uri)
        except ExecutionError as exc:
            hint = "" if endpoint else (" (no AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL is set: an S3-compatible "
                                        "store needs one)")
            raise ExecutionError(f"{exc}{hint}") from None
        bucket = parse_s3_uri(uri)[0]
        try:
            S3Storage(max_attempts=2, progress=False).check_bucket(bucket)
        except Exception as exc:  # noqa: BLE001 - one line, whatever botocore raised
            text = str(exc).splitlines()[0][:200] if not isinstance(exc, StorageError) else str(exc)
            raise ExecutionError(f"{setting}={uri!r}: bucket {bucket!r} is not usable ({text})") from None


def preflight(ray_cfg: RayManifestConfig, resources: ResourcesConfig, storage: str, tracking_uri: str,
              resources_setting: str = "resources_per_trial") -> None:
    """The checks after `check_object_store` (which the caller runs before it reads Ray's saved state
    from the storage): the tracking server answers, Ray starts or is joined, a trial fits on a node."""
    check_tracking_reachable(tracking_uri)
    init_ray(ray_cfg)
    check_remote_reach(ray_cfg.address, storage, tracking_uri)
    check_fits(resources, resources_setting, autoscaling=ray_cfg.autoscaling)


# -- the plan and its run ----------------------------------------------------------------------------
class TrialName:
    """Ray trial name / folder from the plan's key function (a class so that Ray can pickle it)."""

    def __init__(self, key: Callable[[dict], str]):
        self.key = key

    def __call__(self, trial) -> str:
        return self.key(trial.config)


@dataclass
class TrialPlan:
    """Everything Tune needs for one job; built by sweep.py or reproduce.py."""

    label: str  # "sweep <name>" / "reproduce <table>": the progress line's prefix
    trainable: Callable  # already bound with tune.with_parameters
    storage: str
    resources: ResourcesConfig
    max_concurrent: int | None
    retries: int
    metric: str
    mode: str
    total: int  # trials the job expects (for "n/total done")
    key: Callable[[dict], str]  # trial config -> stable trial key
    num_samples: int = 1
    param_space: dict[str, Any] | None = None
    search_alg: Any = None
    scheduler: Any = None
    callbacks: list[Any] = field(default_factory=list)


def build_tuner(plan: TrialPlan, restore: bool):
    """The one Tuner builder; `restore` continues Ray's saved experiment (unfinished and errored trials)."""
    from ray import tune

    fn = tune.with_resources(plan.trainable, trial_resources(plan.resources))
    fs, path, _ = experiment_location(plan.storage)
    if restore:
        return tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs)
    fs, base = storage_filesystem(plan.storage)
    name = TrialName(plan.key)
    # reuse_actors: a trial's actor (torch and the data already imported) runs the next trial; Tune waits
    # TUNE_FUNCTION_THREAD_TIMEOUT_S for the previous trial's thread to end (orchestration/env.py).
    return tune.Tuner(
        fn, param_space=plan.param_space,
        tune_config=tune.TuneConfig(search_alg=plan.search_alg, scheduler=plan.scheduler,
                                    num_samples=plan.num_samples, max_concurrent_trials=plan.max_concurrent,
                                    trial_name_creator=name, trial_dirname_creator=name, reuse_actors=True),
        run_config=tune.RunConfig(
            name=EXPERIMENT_DIR, storage_path=base, storage_filesystem=fs, verbose=0,
            failure_config=tune.FailureConfig(max_failures=plan.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=[*plan.callbacks]))


def run_plan(plan: TrialPlan, restore: bool):
    """Runs the plan with the progress display; returns Tune's ResultGrid. The caller has run `preflight`
    (before it opened any MLflow run or wrote any file)."""
    progress = Progress(plan.label, plan.total, plan.metric, plan.mode, plan.key)
    plan.callbacks = [progress, *plan.callbacks]
    return build_tuner(plan, restore).fit()


class Progress(Callback):
    """One line per finished or failed trial and one every 30 s: done / running (with their progress) /
    failed, and the best value of the metric reported so far by any trial (it never goes down)."""

    def __init__(self, label: str, total: int, metric: str, mode: str, key: Callable[[dict], str] | None = None,
                 every_s: float = PROGRESS_EVERY_S):
        self.label, self.total, self.metric, self.mode, self.every_s = label, total, metric, mode, every_s
        self.key = key
        self.best: tuple[float, str] | None = None
        self.t0, self.last = time.time(), 0.0

    def setup(self, *args, **kwargs) -> None:
        self.t0, self.last = time.time(), 0.0

    def _key(self, trial) -> str:
        if self.key is not None and trial.config:
            try:
                return self.key(trial.config)
            except (KeyError, TypeError, ValueError):
                pass
        return str((trial.last_result or {}).get(KEY_KEY, trial))

    def _better(self, value: float) -> bool:
        return self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value) and self._better(float(value)):
            self.best = (float(value), self._key(trial))

    def line(self, trials, event: str = "") -> str:
        done = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = [t for t in trials if t.status == "RUNNING"]
        shown = ", ".join(f"{self._key(t)} "
                          f"{100 * float((t.last_result or {}).get(PROGRESS_KEY, 0.0)):.0f}%"
                          for t in running[:SHOWN_RUNNING])
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - self.t0))
        best = f" | best reported {self.metric} {self.best[0]:.2f} ({self.best[1]})" if self.best else ""
        return (f"[{self.label} {elapsed}] {done}/{self.total} done, {len(running)} running"
                f"{f' ({shown})' if shown else ''}{f', {failed} failed' if failed else ''}{best}{event}")

    def _print(self, trials, event: str = "") -> None:
        print(self.line(trials, event), flush=True)
        self.last = time.time()

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.time() - self.last >= self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        value = last.get(self.metric)
        shown = f" ({self.metric} {value:.2f})" if isinstance(value, int | float) else ""
        self._print(trials, f" | {self._key(trial)} finished{shown}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(trials, f" | {self._key(trial)} failed (attempt {trial.run_metadata.num_failures})")
