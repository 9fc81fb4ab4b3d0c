"""docker/ without a Docker engine (none runs on these machines): every file is parsed and checked
against a schema, and the command lines its services run are the ones the loopback tests run.

Schemas: Ray ships its cluster-launcher schema (ray/autoscaler/ray-schema.json) and config preparation;
those are used as is. No compose-spec or KubeRay CRD schema is installable offline, so COMPOSE_SCHEMA
and RAYJOB_SCHEMA below are minimal JSON schemas written for this project: they cover the fields these
files use (and forbid misspelt ones at the levels they describe), not the whole specifications.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestration import cluster, services

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SERVICE_COMMANDS = {"ray-head", "ray-worker", "mlflow-server", "s3-server"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}}
COMPOSE_SCHEMA = {
    "type": "object", "required": ["services"],
    "properties": {
        "name": {"type": "string"}, "services": {"type": "object", "additionalProperties": {"$ref": "#/$defs/svc"}},
        "secrets": {"type": "object", "additionalProperties": {"type": "object", "required": ["file"]}},
        "volumes": {"type": "object"}},
    "patternProperties": {"^x-": {}}, "additionalProperties": False,
    "$defs": {"svc": {
        "type": "object", "required": ["image"], "additionalProperties": False,
        "properties": {
            "image": {"type": "string"}, "command": {"type": "array", "items": {"type": "string"}},
            "environment": _STR_MAP, "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
            "volumes": {"type": "array", "items": {"type": "string"}},
            "ports": {"type": "array", "items": {"type": "string", "pattern": r"^127\.0\.0\.1:\d+:\d+$"}},
            "secrets": {"type": "array", "items": {"type": "string"}}, "shm_size": {"type": "string"},
            "user": {"type": "string"}, "healthcheck": {"type": "object"}, "deploy": {"type": "object"},
            "depends_on": {"oneOf": [{"type": "array", "items": {"type": "string"}},
                                     {"type": "object", "additionalProperties": {
                                         "type": "object", "required": ["condition"]}}]}}}},
}
_CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "env": {"type": "array", "items": {
        "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}},
    "resources": {"type": "object", "properties": {"limits": {"type": "object"}, "requests": {"type": "object"}}},
    "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"}}}
_POD = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object", "required": ["containers"],
                                                                        "properties": {"containers": {
                                                                            "type": "array", "minItems": 1,
                                                                            "items": _CONTAINER}}}}}
_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # KubeRay wants strings here
RAYJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"], "additionalProperties": False,
                 "properties": {
                     "entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                     "ttlSecondsAfterFinished": {"type": "integer"},
                     "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                     "rayClusterSpec": {
                         "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
                         "properties": {
                             "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                             "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                               "properties": {"rayStartParams": _PARAMS, "template": _POD}},
                             "workerGroupSpecs": {"type": "array", "items": {
                                 "type": "object", "required": ["groupName", "template"],
                                 "properties": {"groupName": {"type": "string"}, "rayStartParams": _PARAMS,
                                                "replicas": {"type": "integer"}, "minReplicas": {"type": "integer"},
                                                "maxReplicas": {"type": "integer"}, "template": _POD}}}}}}}},
}


# --------------------------------------------------------------------------------------------------
# Dockerfile, .dockerignore, entry point, Makefile's PREBUILT environment
# --------------------------------------------------------------------------------------------------
def _dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def test_dockerfile_copies_existing_paths_and_pins_its_base():
    text = _dockerfile()
    sources = [s for line in re.findall(r"^COPY (?:--chown=\S+ )?(.+)$", text, re.M) for s in line.split()[:-1]]
    assert sources and not (DOCKER / "Dockerfile.cuda").exists()  # one image, TORCH=cpu|cuda
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11[.\w-]*@sha256:[0-9a-f]{64}", base), base  # python 3.11, by digest
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert 'constraints-${TORCH}.txt' in text and "scripts/pip_sources.py" in text


def test_image_runs_as_a_user_with_the_environment_prebuilt():
    text = _dockerfile()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert text.index("USER ") < text.index("ENTRYPOINT")
    env = " ".join(re.findall(r"^ENV (.+(?:\\\n.+)*)", text, re.M))
    assert "VENV=/opt/venv" in env and "PREBUILT=1" in env and "PATH=/opt/venv/bin:$PATH" in env
    entry = re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)
    cmd = re.search(r"^CMD (.+)$", text, re.M).group(1)
    assert entry.startswith("[") and "/opt/s4mc/docker/entrypoint.sh" in entry
    assert cmd.startswith("[") and "$" not in cmd  # exec form never expands variables: none are used
    assert os.access(ENTRYPOINT, os.X_OK)


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes (prefix match here)."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        body = pat[1:] if neg else pat
        if body == "*" or rel == body.rstrip("/") or rel.startswith(body.rstrip("/") + "/") or \
                (body.startswith("**/") and (rel.endswith("/" + body[3:]) or rel == body[3:] or
                                             f"/{body[3:]}/" in f"/{rel}/")):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_secrets_and_state_out_of_the_context():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copied = [s for line in re.findall(r"^COPY (?:--chown=\S+ )?(.+)$", _dockerfile(), re.M)
              for s in line.split()[:-1]]
    for src in copied:
        assert not _ignored(src, patterns), f"{src} is copied but ignored"
    for secret in (".venv/bin/python", ".git/config", "mlruns/mlflow.db", ".cluster/s4mc.env", ".env",
                   "sweeps/x/optuna.db", "s4mc/__pycache__/x.pyc", "docker/compose.yaml"):
        assert _ignored(secret, patterns), f"{secret} would be sent to the Docker daemon"


def test_prebuilt_environment_is_used_not_rebuilt(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / "bin" / "python").chmod(0o755)
    out = subprocess.run(["make", "-n", "sweep", "PREBUILT=1", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "-m venv" not in out.stdout and "pip install" not in out.stdout
    assert f"{venv}/bin/s4mc-sweep run" in out.stdout
    bare = subprocess.run(["make", "setup", "PREBUILT=1", f"VENV={tmp_path / 'missing'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0 and "PREBUILT=1 but" in bare.stdout + bare.stderr


def _entry(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    out = subprocess.run([str(ENTRYPOINT), *args, "--print"], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout.strip())


def test_entrypoint_builds_the_services_command_lines():
    ray = str(Path(sys.executable).parent / "ray")
    assert _entry(["ray-head"]) == services.ray_head_argv(ray=ray)
    assert _entry(["ray-worker"], {"RAY_HEAD_ADDRESS": "h:6379"}) == services.ray_worker_argv("h:6379", ray=ray)
    uri = "postgresql+psycopg2://s4mc@db:5432/mlflow"
    assert _entry(["mlflow-server"], {"MLFLOW_BACKEND_STORE_URI": uri, "MLFLOW_ARTIFACTS_DESTINATION": "s3://a/"}) \
        == services.mlflow_server_argv(uri, "s3://a/", "127.0.0.1", 5000)
    out = subprocess.run([str(ENTRYPOINT), "ray-worker"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                              "RAY_HEAD_ADDRESS": ""})
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "RAY_HEAD_ADDRESS" in out.stderr


# --------------------------------------------------------------------------------------------------
# docker/compose.yaml
# --------------------------------------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())  # anchors and merge keys resolved


def _interpolate(env: dict) -> dict[str, str]:
    """Compose's ${VAR:?msg} / ${VAR:-default} with dummy values for the user's secrets."""
    def one(value) -> str:
        return re.sub(r"\$\{(\w+)(?::[?-]([^}]*))?\}", lambda m: f"dummy-{m.group(1)}", str(value))
    return {k: one(v) for k, v in env.items()}


def test_compose_file_matches_its_schema_and_keeps_secrets_in_the_environment():
    doc = _compose()
    jsonschema.validate({k: v for k, v in doc.items()}, COMPOSE_SCHEMA)
    assert {"postgres", "s3", "mlflow", "ray-head", "ray-worker"} <= set(doc["services"])
    for name, svc in doc["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN$", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key} is not taken from the environment"
        if svc["image"].startswith("${S4MC_IMAGE"):
            assert svc["command"][0] in SERVICE_COMMANDS and svc.get("user") is None, name
    for name in ("ray-head", "ray-worker"):
        env = doc["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "ray_auth_token" in doc["services"][name]["secrets"]
    assert doc["services"]["ray-head"]["environment"]["RAY_DASHBOARD_HOST"] == "127.0.0.1"


def test_compose_services_run_the_loopback_tests_command_lines(tmp_path):
    doc = _compose()
    ray = str(Path(sys.executable).parent / "ray")
    token = tmp_path / "ray_auth_token"  # stands in for the compose secret at /run/secrets/ray_auth_token
    token.write_text("token")
    lines = {name: _entry(svc["command"], {**_interpolate(svc["environment"]), "RAY_AUTH_TOKEN_PATH": str(token)})
             for name, svc in doc["services"].items() if svc["image"].startswith("${S4MC_IMAGE")}
    assert lines["ray-head"] == services.ray_head_argv(6379, dashboard_host="127.0.0.1", ray=ray)
    assert lines["ray-worker"] == services.ray_worker_argv("ray-head:6379", ray=ray)
    ml = doc["services"]["mlflow"]["environment"]
    assert lines["mlflow"] == services.mlflow_server_argv(ml["MLFLOW_BACKEND_STORE_URI"],
                                                          ml["MLFLOW_ARTIFACTS_DESTINATION"], "0.0.0.0", 5000, 2,
                                                          ml["MLFLOW_ALLOWED_HOSTS"])
    assert ":" not in ml["MLFLOW_BACKEND_STORE_URI"].split("@")[0].split("//")[1]  # no password in the URI
    assert lines["s3"][:3] == services.seaweed_s3_argv("/var/lib/s4mc/s3", "0.0.0.0", 8333, {})[:3]
    assert "-s3.port=8333" in lines["s3"]
    init = (DOCKER / "postgres-init.sql").read_text()
    assert "CREATE DATABASE optuna" in init


# --------------------------------------------------------------------------------------------------
# docker/kuberay.yaml
# --------------------------------------------------------------------------------------------------
def test_kuberay_rayjob_matches_its_schema_and_the_head_command_line():
    doc = yaml.safe_load((DOCKER / "kuberay.yaml").read_text())
    jsonschema.validate(doc, RAYJOB_SCHEMA)
    spec = doc["spec"]["rayClusterSpec"]
    params = spec["headGroupSpec"]["rayStartParams"]
    head_flags = set(services.ray_head_argv(block=False)[3:])  # KubeRay adds --head and the port itself
    assert {f"--{k}={v}" for k, v in params.items() if v != "true"} <= head_flags
    assert "--disable-usage-stats" in head_flags and params["disable-usage-stats"] == "true"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"].startswith("/etc/ray-token/")
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)  # pods use their own identity
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    assert "make -C /opt/s4mc sweep" in doc["spec"]["entrypoint"]


# --------------------------------------------------------------------------------------------------
# docker/ray-cluster.yaml (Ray's schema and config preparation)
# --------------------------------------------------------------------------------------------------
def test_ray_cluster_definition_passes_rays_schema_and_preparation():
    cfg = cluster.with_image(cluster.load_template(), "ghcr.io/you/s4mc:0.1.0-cuda")
    prepared = cluster.validate(cfg)
    head_cmd = prepared["head_start_ray_commands"][-1]
    assert shlex.split(head_cmd) == services.ray_head_argv(
        6379, autoscaling_config="~/ray_bootstrap_config.yaml", block=False)
    assert shlex.split(prepared["worker_start_ray_commands"][-1]) == \
        services.ray_worker_argv("$RAY_HEAD_IP:6379", block=False)
    docker = prepared["docker"]
    assert not any("--gpus" in o for o in docker["run_options"]) and "--gpus all" in docker["worker_run_options"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"] and "~/.ray/auth_token" in prepared["file_mounts"]
    assert prepared["setup_commands"] == [] and prepared["head_setup_commands"] == []
    assert prepared["available_node_types"]["gpu_worker"]["resources"]["GPU"] > 0


def test_ray_cluster_rendering_errors_are_one_line(tmp_path):
    with pytest.raises(cluster.ClusterConfigError, match=r"IMAGE='S4MC_IMAGE' is not an image reference"):
        cluster.render("S4MC_IMAGE", tmp_path / "c.yaml")
    cfg = cluster.load_template()
    broken = dict(cfg, head_start_ray_commands=["ray start --head --port=6379"])
    with pytest.raises(cluster.ClusterConfigError, match="lacks --autoscaling-config"):
        cluster.validate(broken)
    with pytest.raises(cluster.ClusterConfigError, match=r"file_mounts\[.*s4mc\.env.*does not exist") as err:
        cluster.check_mounts({"file_mounts": {"/home/ubuntu/s4mc.env": ".cluster/s4mc.env"}}, tmp_path)
    assert "\n" not in str(err.value)
    out = cluster.render("ghcr.io/you/s4mc:0.1.0-cuda", tmp_path / "c.yaml", check_files=False)
    assert yaml.safe_load(out.read_text())["docker"]["image"] == "ghcr.io/you/s4mc:0.1.0-cuda"


# --------------------------------------------------------------------------------------------------
# The head / worker command lines on loopback, with token authentication as on the cluster
# --------------------------------------------------------------------------------------------------
@pytest.mark.services
def test_head_and_worker_command_lines_form_a_token_authenticated_cluster(tmp_path):
    from conftest import stop_ray_processes

    token = tmp_path / "auth_token"
    token.write_text("s4mc-test-token-" + os.urandom(8).hex())
    temp = {"head": f"/tmp/ray-s4mc-{os.getpid()}dh", "worker": f"/tmp/ray-s4mc-{os.getpid()}dw"}
    port = services.free_port("127.0.0.2")
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}

    def extra(*names: str) -> str:  # other sessions' clusters hold Ray's default ports on this machine
        return " ".join(["--num-cpus=1", "--object-store-memory=80000000"] +
                        [f"--{n}={services.free_port()}" for n in names])
    procs = []
    try:
        for role, env in (("head", {"RAY_NODE_IP": "127.0.0.2", "RAY_PORT": str(port), "RAY_START_ARGS": extra(
                              "dashboard-port", "dashboard-agent-listen-port", "metrics-export-port")}),
                          ("worker", {"RAY_NODE_IP": "127.0.0.3", "RAY_HEAD_ADDRESS": f"127.0.0.2:{port}",
                                      "RAY_START_ARGS": extra("dashboard-agent-listen-port", "metrics-export-port")})):
            procs.append(subprocess.Popen([str(ENTRYPOINT), f"ray-{role}"], cwd=ROOT, start_new_session=True,
                                          env={**base, **env, "RAY_TEMP_DIR": temp[role]},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(2 if role == "head" else 0)
        probe = "\n".join([
            "import ray, time", f"ray.init(address='127.0.0.2:{port}', log_to_driver=False)",
            "for _ in range(120):", "    alive = [n for n in ray.nodes() if n['Alive']]",
            "    if len(alive) == 2: break", "    time.sleep(0.5)",
            "print(sorted(n['NodeManagerAddress'] for n in alive))"])
        out = subprocess.run([sys.executable, "-c", probe], env=base, capture_output=True, text=True, timeout=180)
        assert "['127.0.0.2', '127.0.0.3']" in out.stdout, out.stderr[-2000:]
        wrong = subprocess.run([sys.executable, "-c", probe.replace("range(120)", "range(1)")], timeout=120,
                               env={**base, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"), "RAY_AUTH_TOKEN": "bad"},
                               capture_output=True, text=True)
        assert wrong.returncode != 0 and "auth" in wrong.stderr.lower(), wrong.stderr[-2000:]  # no token: refused
    finally:
        for proc in procs:
            proc.terminate()
        stop_ray_processes(temp.values())
