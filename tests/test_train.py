"""End-to-end training on the embedded set with tiny budgets: every host with S4MC on and off,
the run folder, and exact resume after an interruption (in-process and a killed process)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s4mc.config import load_config
from s4mc.train import StopTraining, run_training
from s4mc.train.callbacks import read_csv

pytestmark = pytest.mark.integration  # trains tiny runs (tests tiers: pyproject.toml)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.embedded.image_size=32", "data.embedded.num_train=48", "data.embedded.num_val=6",
        "data.crop_size=32", "data.split=20", "data.batch_size=2", "data.unlabeled_batch_size=2",
        "model.width=0.25", "model.head_channels=32", "train.steps=4", "train.eval_every=2",
        "train.log_every=1", "train.threads=1", "train.progress=false", "eval.batch_size=6"]


def tiny_cfg(host: str, s4mc: bool, run_dir: Path, *extra: str):
    return load_config(overrides=TINY + [f"host.name={host}", f"s4mc.enabled={str(s4mc).lower()}",
                                         f"run.dir={run_dir}", *extra])


@pytest.mark.parametrize("host, s4mc", [("supervised", False), ("cutmix_seg", False), ("cutmix_seg", True),
                                        ("fixmatch", False), ("fixmatch", True), ("unimatch", False),
                                        ("unimatch", True)])
def test_every_host_trains_with_s4mc_on_and_off(tmp_path, host, s4mc):
    summary = run_training(tiny_cfg(host, s4mc, tmp_path))
    assert summary["steps"] == 4 and 0.0 <= summary["best/eval/mIoU"] <= 100.0
    for name in ("config.yaml", "versions.json", "metrics.jsonl", "train.csv", "eval.csv", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / name).exists(), name
    train_rows = read_csv(tmp_path / "train.csv")
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    if host == "supervised":
        assert "pl/quantity" not in train_rows[0]
    else:
        for suffix in ("", "_no_refine"):
            quantity, quality = train_rows[0]["pl/quantity" + suffix], train_rows[0]["pl/quality" + suffix]
            assert 0.0 <= quantity <= 1.0
            # Quality is undefined (NaN) exactly when nothing was kept (fixed 0.95 at initialisation).
            assert (0.0 <= quality <= 1.0) if quantity > 0 else quality != quality
    eval_rows = read_csv(tmp_path / "eval.csv")
    assert [r["step"] for r in eval_rows] == [2, 4] and "eval/IoU/background" in eval_rows[0]


def test_s4mc_off_is_a_true_baseline(tmp_path):
    """With S4MC off the kept pixels are exactly kappa_max > 0.95: refinement never decides."""
    cfg = tiny_cfg("fixmatch", False, tmp_path, "s4mc.refine=true", "s4mc.dpa=true")
    from s4mc.train.build import build_pseudo_labeler

    labeler = build_pseudo_labeler(cfg, None)
    probs = torch.rand(2, 11, 8, 8).softmax(1) ** 0.2
    probs = probs / probs.sum(1, keepdim=True)
    probs[0, 3] += 5.0
    probs = probs / probs.sum(1, keepdim=True)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    out = labeler(probs, valid, 0.0)
    assert torch.equal(out.keep, probs.max(1).values > 0.95)


def _comparable(metrics: dict) -> str:
    """Metrics minus wall-clock timing, as JSON so that NaN (absent class) compares equal to NaN."""
    return json.dumps({k: v for k, v in metrics.items() if k != "train/time_s"}, sort_keys=True)


def _eval_rows(run_dir: Path) -> list[str]:
    return [_comparable(row) for row in read_csv(run_dir / "eval.csv")]


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_eval(self, step, metrics):
        if step == self.step:
            raise StopTraining


def _final_state(run_dir: Path):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    extra = ["train.steps=6"]
    full = run_training(tiny_cfg("unimatch", True, tmp_path / "a", *extra, "s4mc.selection=random"))
    stopped = run_training(tiny_cfg("unimatch", True, tmp_path / "b", *extra, "s4mc.selection=random"),
                           callbacks=[StopAt(2)])
    assert stopped["stopped_early"] and stopped["steps"] == 2
    resumed = run_training(tiny_cfg("unimatch", True, tmp_path / "b", *extra, "s4mc.selection=random"))
    assert _comparable(resumed["final"]) == _comparable(full["final"])
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    for key, value in a["student"].items():
        assert torch.equal(value, b["student"][key]), key
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()
    assert _eval_rows(tmp_path / "a") == _eval_rows(tmp_path / "b")


def test_killed_process_resumes_exactly(tmp_path):
    """SIGKILL a real `s4mc train` process after its first checkpoint, run it again, compare."""
    args = TINY + ["train.steps=8", "train.eval_every=2", "host.name=cutmix_seg"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "s4mc.cli", "train"]
    subprocess.run(cmd + args + [f"run.dir={tmp_path / 'a'}"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + args + [f"run.dir={tmp_path / 'b'}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000004.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(cmd + args + [f"run.dir={tmp_path / 'b'}"], check=True, env=env, capture_output=True)
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert _comparable(a["final"]) == _comparable(b["final"])
    assert _eval_rows(tmp_path / "a") == _eval_rows(tmp_path / "b")


def test_resume_refuses_a_different_schedule(tmp_path):
    run_training(tiny_cfg("supervised", False, tmp_path))
    with pytest.raises(ValueError, match="made for 4 steps but the config asks for 6"):
        run_training(tiny_cfg("supervised", False, tmp_path, "train.steps=6"))


def test_cli_bad_override_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "s4mc.cli", "train", "s4mc.neighbourhood=6"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: s4mc.neighbourhood='6' is not allowed; expected one of: "
                                  "3x3, 4, 5x5, 7x7")


def test_boundary_iou_is_logged_on_request(tmp_path):
    run_training(tiny_cfg("supervised", False, tmp_path, "eval.boundary_iou=true", "train.steps=2"))
    row = read_csv(tmp_path / "eval.csv")[-1]
    assert 0.0 <= row["eval/boundary_mIoU"] <= 100.0 and "eval/boundary_IoU/background" in row


def test_epochs_count_images_across_data_parallel_processes():
    from s4mc.train.build import build_data, total_steps

    cfg = load_config(overrides=TINY + ["host.name=fixmatch", "train.epochs=2"])
    data = build_data(cfg, num_strong=1, needs_unlabeled=True)
    pool = len(data.unlabeled)  # 48 scenes - 20 labeled = 28 unlabeled, batch 2 per process
    assert total_steps(cfg, data) == 2 * -(-pool // 2)
    assert total_steps(cfg, data, world_size=2) == 2 * -(-pool // 4)


# ------------------------------------------------------------------ host fidelity (docs/hosts.md)

class Rows:
    """Records the rows the trainer hands to callbacks."""

    def __init__(self):
        self.train, self.eval = {}, {}

    def on_step(self, step, metrics):
        self.train[step] = dict(metrics)

    def on_eval(self, step, metrics):
        self.eval[step] = dict(metrics)


def test_supervised_warm_up_steps(tmp_path):
    from s4mc.train.build import build_run

    rows = Rows()
    cfg = tiny_cfg("cutmix_seg", True, tmp_path, "train.sup_only_steps=2", "train.keep_checkpoints=2")
    run_training(cfg, callbacks=[rows])
    for step in (1, 2):  # steps 0 and 1: the supervised loss alone, no pseudo-labels at all
        row = rows.train[step]
        assert row["train/loss"] == row["train/loss_sup"] and "train/loss_unsup" not in row
        assert not [k for k in row if k.startswith("pl/")]
    for step in (3, 4):
        row = rows.train[step]
        assert {"pl/quantity", "pl/quality", "train/loss_unsup"} <= set(row)
        assert row["train/loss"] == pytest.approx(row["train/loss_sup"] + row["train/loss_unsup"])
    # The eval after the warm-up has no pl/* averages; the next one does. Both are valid rows.
    assert not [k for k in rows.eval[2] if k.startswith("pl/")] and "pl/quantity" in rows.eval[4]
    eval_rows = read_csv(tmp_path / "eval.csv")
    assert [r["step"] for r in eval_rows] == [2, 4] and eval_rows[0]["pl/quantity"] != eval_rows[0]["pl/quantity"]
    assert [r["step"] for r in read_csv(tmp_path / "train.csv")] == [1, 2, 3, 4]
    # The EMA teacher follows the student during the warm-up.
    init = build_run(cfg, torch.device("cpu")).student.state_dict()
    teacher = torch.load(tmp_path / "checkpoints" / "step_00000002.pt", weights_only=False)["teacher"]
    assert any(not torch.equal(teacher[k], init[k]) for k in init if init[k].is_floating_point())


def test_resume_inside_the_warm_up_equals_uninterrupted(tmp_path):
    extra = ["train.steps=6", "train.sup_only_steps=3"]
    full = run_training(tiny_cfg("cutmix_seg", True, tmp_path / "a", *extra))
    run_training(tiny_cfg("cutmix_seg", True, tmp_path / "b", *extra), callbacks=[StopAt(2)])
    resumed = run_training(tiny_cfg("cutmix_seg", True, tmp_path / "b", *extra))  # from step 2 < 3
    assert _comparable(resumed["final"]) == _comparable(full["final"])
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()
    assert _eval_rows(tmp_path / "a") == _eval_rows(tmp_path / "b")


def test_sup_only_steps_must_leave_a_semi_supervised_step(tmp_path):
    from s4mc.config import ConfigError

    cfg = tiny_cfg("fixmatch", True, tmp_path, "train.epochs=1", "train.sup_only_steps=14")
    with pytest.raises(ConfigError, match="train.sup_only_steps=14 leaves no semi-supervised step of the 14"):
        run_training(cfg)  # 28 unlabeled scenes / batch 2 = 14 steps, known once the data is built


@pytest.mark.parametrize("host, choice, expected", [("cutmix_seg", "auto", "teacher"),
                                                    ("cutmix_seg", "student", "student"),
                                                    ("fixmatch", "auto", "student")])
def test_eval_model_is_the_one_evaluated(tmp_path, monkeypatch, host, choice, expected):
    from s4mc.train.build import Run

    seen = []
    original = Run.evaluate

    def spy(self, model):
        seen.append("teacher" if model is self.teacher else "student" if model is self.student else "?")
        return original(self, model)

    monkeypatch.setattr(Run, "evaluate", spy)
    summary = run_training(tiny_cfg(host, True, tmp_path, f"eval.model={choice}", "train.steps=2"))
    assert seen == [expected]
    assert summary["eval_model"] == expected
    assert json.loads((tmp_path / "summary.json").read_text())["eval_model"] == expected
    assert read_csv(tmp_path / "eval.csv")[0]["eval/model_is_teacher"] == float(expected == "teacher")
    assert yaml_value(tmp_path / "config.yaml", "eval", "model") == choice  # the config keeps "auto"


def yaml_value(path: Path, *keys: str):
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    for key in keys:
        node = node[key]
    return node


def test_every_step_steps_the_optimizer(tmp_path):
    """Fails on a trainer that steps the optimizer once per epoch (or once per run), the released
    U2PL-based code's defect (docs/method.md §9): AdamW counts its steps per parameter."""
    n = 4
    run_training(tiny_cfg("cutmix_seg", True, tmp_path, "train.optimizer=adamw", f"train.steps={n}",
                          "train.keep_checkpoints=2"))
    ckpts = [torch.load(tmp_path / "checkpoints" / f"step_{s:08d}.pt", weights_only=False) for s in (2, 4)]
    state = ckpts[1]["optimizer"]
    num_params = sum(len(g["params"]) for g in state["param_groups"])
    assert len(state["state"]) == num_params  # every parameter got a gradient and an update
    assert {float(s["step"]) for s in state["state"].values()} == {float(n)}
    assert {float(s["step"]) for s in ckpts[0]["optimizer"]["state"].values()} == {2.0}
    before, after = ckpts[0]["student"], ckpts[1]["student"]
    params = [k for k, v in after.items() if v.is_floating_point() and "running" not in k]
    assert all(not torch.equal(before[k], after[k]) for k in params)
