"""The execution layer's rules and the package layering, without services.

The layering rule (docs/architecture.md): s4mc/ imports none of ray, mlflow, optuna, boto3; the modules
a trial process imports (orchestration/trial.py and what it pulls in) never import Optuna; no import
cycle exists between orchestration modules, counting imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestration import execution
from orchestration.execution import Progress
from orchestration.manifest import ResourcesConfig, load_manifest
from orchestration.results import _one_per_trial
from tests.test_sweep import write_manifest

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("ray", "mlflow", "optuna", "boto3", "botocore", "pyarrow")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _orchestration_graph() -> dict[str, set[str]]:
    mods = {p.stem: p for p in (REPO / "orchestration").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in mods.items():
        deps = {imp.split(".")[1] for imp in _imports(path) if imp.startswith("orchestration.")}
        graph[name] = deps & set(mods) - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> list[str] | None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d, stack + [d])):
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n, [n])):
            return found
    return None


def test_no_import_cycle_in_orchestration():
    assert _cycle(_orchestration_graph()) is None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_s4mc_never_imports_a_service_client():
    for path in (REPO / "s4mc").rglob("*.py"):
        bad = {imp for imp in _imports(path) if imp.split(".")[0] in SERVICES}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_trial_processes_do_not_import_optuna():
    graph = _orchestration_graph()
    seen, todo = set(), ["trial"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert "search" not in seen and "sweep" not in seen, sorted(seen)
    for name in seen:
        imports = _imports(REPO / "orchestration" / f"{name}.py")
        assert not any(i.split(".")[0] == "optuna" for i in imports), name


def _trial(key: str, status: str = "RUNNING", progress: float = 0.5):
    return SimpleNamespace(config={"trial": key}, status=status, trial_id=key,
                           last_result={"trial/progress": progress}, run_metadata=SimpleNamespace(num_failures=1))


def test_progress_best_never_goes_down():
    p = Progress("sweep s", 3, "eval/mIoU", "max", key=lambda c: c["trial"])
    a, b = _trial("s-t000"), _trial("s-t001")
    p.on_trial_result(0, [a, b], a, {"eval/mIoU": 8.90})
    p.on_trial_result(0, [a, b], b, {"eval/mIoU": 8.64})
    p.on_trial_result(0, [a, b], a, {"eval/mIoU": 8.52})  # a later, lower report of the leader
    line = p.line([a, b])
    assert "best reported eval/mIoU 8.90 (s-t000)" in line and "0/3 done, 2 running (s-t000 50%, s-t001 50%)" in line
    low = Progress("sweep s", 1, "train/loss", "min", key=lambda c: c["trial"])
    low.on_trial_result(0, [a], a, {"train/loss": 0.5})
    low.on_trial_result(0, [a], a, {"train/loss": 0.7})
    assert "best reported train/loss 0.50" in low.line([a])


def test_results_hold_each_trial_once():
    row = {"trial": "s-t002", "evaluations": 1, "error": None, "segments": [(0.0, 1.0)]}
    again = {"trial": "s-t002", "evaluations": 0, "error": "could not re-use actor", "segments": [(2.0, 2.5)]}
    other = {"trial": "s-t003", "evaluations": 2, "error": None, "segments": []}
    rows = _one_per_trial([dict(row), dict(again), dict(other)])
    assert [r["trial"] for r in rows] == ["s-t002", "s-t003"]
    assert rows[0]["evaluations"] == 1 and rows[0]["train_s"] == 1.5


def test_a_cluster_of_several_machines_needs_shared_storage_and_a_tracking_server(monkeypatch):
    monkeypatch.setattr(execution, "_cluster_hosts", lambda: {"10.0.0.1", "10.0.0.2"})
    monkeypatch.delenv("S4MC_SHARED_STORAGE", raising=False)
    with pytest.raises(execution.ExecutionError, match=r"storage='/data/sweeps' is a local folder"):
        execution.check_remote_reach("10.0.0.1:6379", "/data/sweeps", "http://mlflow:5000")
    with pytest.raises(execution.ExecutionError, match=r"tracking.uri='sqlite:////x.db' is a local store"):
        execution.check_remote_reach("10.0.0.1:6379", "s3://b/sweeps", "sqlite:////x.db")
    execution.check_remote_reach("10.0.0.1:6379", "s3://b/sweeps", "http://mlflow:5000")
    monkeypatch.setattr(execution, "_cluster_hosts", lambda: {"127.0.0.2", "127.0.0.3"})  # one machine
    execution.check_remote_reach("127.0.0.2:6379", "/data/sweeps", "sqlite:////x.db")


def test_a_resume_that_changes_the_experiment_is_refused(tmp_path):
    from orchestration.sweep import SweepError, check_resume_compatible, resume_fingerprint

    path = write_manifest(tmp_path, "resume", search=[])
    state = {"manifest": resume_fingerprint(load_manifest(path))}
    check_resume_compatible(state, load_manifest(path, ["num_trials=5"]))  # more trials: allowed
    with pytest.raises(SweepError, match=r"manifest key 'overrides' changed"):
        check_resume_compatible(state, load_manifest(path, ["overrides.train.steps=3"]))
    with pytest.raises(SweepError, match=r"manifest key 'scheduler' changed"):
        check_resume_compatible(state, load_manifest(path, ["scheduler.name=fifo"]))


def test_the_resource_rule_is_one_for_both_jobs():
    assert execution.trial_resources(ResourcesConfig(cpu=2, gpu=0.5)) == {"cpu": 2, "gpu": 0.5}
    dp = ResourcesConfig(cpu=8, gpu=4)
    assert execution.trial_resources(dp) == {"cpu": execution.DRIVER_CPU}
    assert execution.worker_bundle(dp) == {"CPU": 2.0, "GPU": 1.0}
    cpu_dp = ResourcesConfig(cpu=2, workers=2)
    assert execution.trial_resources(cpu_dp) == {"cpu": execution.DRIVER_CPU}
    assert execution.worker_bundle(cpu_dp) == {"CPU": 1.0, "GPU": 0.0}


def test_error_line_is_the_exception_not_rays_banner():
    text = ("Failure # 1 (occurred at 2026-12-02_03-00-00)\nray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise ValueError('bad')\n"
            "ValueError: run.dir='/x': cannot write there")
    assert execution.error_line(text) == "ValueError: run.dir='/x': cannot write there"
