"""The cluster stack on real services on loopback, and no secret leaking out of it.

PostgreSQL (Debian's server, started here in a temporary directory) holds both MLflow's backend store
and the Optuna study; the MLflow server proxies artifacts to S3 (moto). A sweep with 2 concurrent
trials runs through the `s4mc-sweep` CLI with its own local Ray, is interrupted (Ctrl-C) after the
first finished trial and resumed. The tracking URI carries a basic-auth password, the Optuna URL the
database password and the environment fake AWS keys: afterwards none of them may appear in the sweep
folder, the trial folders, the MLflow database (params, tags, everything: a pg_dump), the MLflow
artifacts in S3, the console of either driver session, or Ray's session logs.
Measured on the 2-core machine: 9-22 s to start the stack, 54-103 s for the two sessions and the checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestration.postgres import pg_bin_dir, postgres
from orchestration.services import start_mlflow_server
from tests.test_sweep import interrupt_after

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "embedded" / "cutmix_seg_s4mc.yaml"
# The tiny trial of tests/test_sweep.py: a few seconds per trial on 2 cores.
TINY = ["train.steps=6", "train.eval_every=3", "train.log_every=1", "data.embedded.num_train=64",
        "data.embedded.num_val=16", "data.embedded.image_size=32", "data.crop_size=32", "model.width=0.25",
        "eval.batch_size=16", "model.pretrained=null", "train.sup_only_steps=0"]
SPACE = [{"key": "s4mc.alpha0", "type": "float", "low": 0.2, "high": 0.6}]
TRACKING_PASSWORD = "trk-PW-s4mc-3f9c1d"  # noqa: S105 (a test value that must never be written anywhere)
RAY_TEMP = f"/tmp/ray-s4mc-{os.getpid()}p"  # short: Ray's socket paths must stay < 107 bytes
ARTIFACTS_BUCKET = "pg-stack-artifacts"


@pytest.fixture(scope="module")
def stack(aws_env, s3):
    """PostgreSQL with databases mlflow + optuna, and an MLflow server on it proxying to S3 (moto)."""
    try:
        pg_bin_dir()
    except RuntimeError as exc:
        if os.environ.get("S4MC_REQUIRE_POSTGRES") == "1":  # .ci/run installs it: a skip would hide a failure
            raise
        pytest.skip(str(exc))  # a developer machine may lack Debian's postgresql package
    s3.client.create_bucket(Bucket=ARTIFACTS_BUCKET)
    with postgres(("mlflow", "optuna")) as pg:
        env = {"PGPASSWORD": pg.password, "MLFLOW_S3_ENDPOINT_URL": aws_env["MLFLOW_S3_ENDPOINT_URL"]}
        with start_mlflow_server(pg.url("mlflow"), f"s3://{ARTIFACTS_BUCKET}/mlflow", env=env) as server:
            yield pg, server


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestration.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _texts(root: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()}


def _leaks(texts: dict[str, str], secrets: list[str]) -> list[str]:
    return [f"{name}: {secret[:6]}..." for name, text in texts.items() for secret in secrets if secret in text]


def test_postgres_backed_sweep_resumes_and_leaks_no_secret(stack, aws_env, s3, tmp_path):
    from conftest import stop_ray_processes

    pg, server = stack
    host = server.url.split("://", 1)[1]
    overrides = {key: yaml.safe_load(value) for key, _, value in (o.partition("=") for o in TINY)}
    manifest = {"name": "pgstack", "base": str(BASE), "overrides": overrides, "search": SPACE, "num_trials": 3,
                "max_concurrent": 2, "scheduler": {"name": "fifo"}, "sampler": {"seed": 0, "n_startup_trials": 2},
                "project": str(tmp_path), "storage": str(tmp_path / "store"), "work_dir": str(tmp_path / "work"),
                # The database password inside the URL, as a user might write it.
                "optuna_storage": pg.url("optuna", with_password=True),
                "ray": {"num_cpus": 2, "temp_dir": RAY_TEMP, "object_store_mb": 100}}
    path = tmp_path / "input" / "pgstack.yaml"  # the user's own file: the one place the password is
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PGPASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    env.update({"MLFLOW_TRACKING_URI": f"http://s4mc:{TRACKING_PASSWORD}@{host}", "RAY_AUTH_MODE": "disabled"})
    try:
        # 130 is the CLI's code for an interrupted sweep; the study is checked for unfinished trials below.
        first = interrupt_after(_cli(["run", "--manifest", str(path)], env), "1/3 done", exit_codes=(0, 130),
                                timeout=300)
        assert _complete(pg) < 3, first[-3000:]  # the first session really stopped early
        second = _cli(["run", "--manifest", str(path), "--resume"], env)
        resumed = second.communicate(timeout=300)[0]
        assert second.returncode == 0, resumed[-3000:]
        _check_results(pg, server, s3, tmp_path, first, resumed)  # reads Ray's logs before they go
    finally:
        stop_ray_processes([RAY_TEMP])


def _complete(pg) -> int:
    import optuna

    os.environ["PGPASSWORD"] = pg.password
    try:
        study = optuna.load_study(study_name="pgstack", storage=pg.url("optuna"))
        return sum(t.state.name == "COMPLETE" for t in study.trials)
    finally:
        del os.environ["PGPASSWORD"]


def _check_results(pg, server, s3, tmp_path: Path, first: str, resumed: str) -> None:
    from mlflow import MlflowClient

    assert _complete(pg) == 3
    os.environ["PGPASSWORD"] = pg.password
    try:
        runs = MlflowClient(server.url).search_runs(
            [MlflowClient(server.url).get_experiment_by_name("pgstack").experiment_id])
        assert len([r for r in runs if r.data.tags.get("trial_key")]) == 3
        dump = subprocess.run([str(pg_bin_dir() / "pg_dump"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user,
                               "mlflow"], capture_output=True, text=True, check=True).stdout
    finally:
        del os.environ["PGPASSWORD"]
    assert "pgstack-t000" in dump and "s4mc.alpha0" in dump  # the dump holds the runs' params and tags
    objects = s3.list_objects(f"s3://{ARTIFACTS_BUCKET}/mlflow/")
    assert any(o.key.endswith("manifest.yaml") for o in objects)
    texts = {"console (first session)": first, "console (resumed session)": resumed, "pg_dump mlflow": dump}
    # The sweep folder (manifest.yaml, summary.json, results.md, ...) and the trial folders.
    texts.update({k: v for k, v in _texts(tmp_path).items() if "/input/" not in k})
    texts.update(_texts(Path(RAY_TEMP)))  # Ray's session logs, runtime_env_agent.log included
    for obj in objects:
        body = s3.client.get_object(Bucket=ARTIFACTS_BUCKET, Key=obj.key)["Body"].read()
        texts[f"s3://{ARTIFACTS_BUCKET}/{obj.key}"] = body.decode("utf-8", "replace")
    assert any("runtime_env" in name for name in texts), "Ray's logs were not found"
    secrets = [TRACKING_PASSWORD, pg.password, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]
    assert not _leaks(texts, secrets), _leaks(texts, secrets)[:10]
