"""The training loop: SGD with a poly schedule, EMA teacher, bf16 autocast on CUDA, evaluation,
checkpoints and exact resume.

Every random draw of step t derives from (seed, t): the batch indices, each sample's augmentation,
CutMix boxes, random neighbour selection and dropout. A run resumed from the checkpoint written after
step t therefore replays steps t+1.. exactly as the uninterrupted run would, and ends with the same
metrics. Metrics stay on the device between log points; the loop synchronises only every
`train.log_every` steps and at evaluations.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm import tqdm

from s4mc.config import to_yaml
from s4mc.frameworks.base import ema_update
from s4mc.train.build import build_run
from s4mc.train.callbacks import CallbackList, MetricsWriter, StopTraining
from s4mc.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from s4mc.train.reporting import print_summary, save_samples, write_versions

# 64-bit mixing constants (splitmix64): turn (seed, step) into independent stream seeds.
_MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    x = (seed * _MIX1 + step * _MIX2 + stream * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    return base_lr * (1.0 - step / total) ** power


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use train.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: dict | None, device: torch.device) -> dict | None:
    if batch is None:
        return None
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}




def _restore(run, optimizer, last: Path, device, total: int) -> tuple[int, float, int, list]:
    """Loads the run's last checkpoint into its models, optimizer and RNGs; (step, best, best step, rows)."""
    state = load_checkpoint(last, map_location=device)
    if int(state["total_steps"]) != total:
        raise ValueError(f"checkpoint {last} was made for {state['total_steps']} steps but the config "
                         f"asks for {total}; use a new run.dir or the same schedule")
    try:
        run.student.load_state_dict(state["student"])
        if run.teacher is not None:
            run.teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:  # torch lists every mismatched tensor: keep one line
        first = str(exc).strip().splitlines()[0][:200]
        raise ValueError(f"checkpoint {last} holds another model or optimizer than the config builds ({first}); "
                         "use a new run.dir, or the model and train config the checkpoint was made with") from None
    set_rng_state(state["rng"])
    return state["step"], state["best_miou"], state["best_step"], state["history"]


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:  # not writable, or a path component is a file
        raise ValueError(f"run.dir={str(run_dir)!r}: cannot write there ({exc.strerror or exc}); choose a "
                         "writable folder with run.dir=...") from None


def _device_for(cfg: DictConfig) -> torch.device:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _Loop:
    """One run's training state between steps: the built run, the streams, the accumulated metrics,
    the timing and the best evaluation so far. `run_training` drives it step by step."""

    def __init__(self, cfg: DictConfig, run_dir: Path, callbacks, resume: bool):
        t_start = time.perf_counter()
        self.cfg, self.run_dir, self.ckpt_dir = cfg, run_dir, run_dir / "checkpoints"
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        self.device = _device_for(cfg)
        self.run = run = build_run(cfg, self.device)
        self.total, self.optimizer = run.total_steps, run.optimizer
        self.start_step, self.best_miou, self.best_step, self.history = 0, -math.inf, -1, []
        last = self.ckpt_dir / "last.pt"
        if resume and last.exists():
            self.start_step, self.best_miou, self.best_step, self.history = _restore(
                run, self.optimizer, last, self.device, self.total)
        if self.is_main:
            _make_run_dir(run_dir)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            write_versions(run_dir / "versions.json", self.device, run.pretrained_path)
        self.writer = MetricsWriter(run_dir, resume_step=self.start_step) if self.is_main else None
        self.cbs = CallbackList(list(callbacks))
        # Start-up: data and model build, weights, restore, run folder (summary and callbacks: startup_s).
        self.startup_s = time.perf_counter() - t_start
        self.cbs.on_train_start({"run_dir": str(run_dir), "total_steps": self.total, "start_step": self.start_step,
                                 "startup_s": self.startup_s,
                                 "num_params": sum(p.numel() for p in run.student.parameters()), "rank": self.rank,
                                 "device": str(self.device)})
        self.model = run.student
        if dist.is_initialized():
            self.model = torch.nn.parallel.DistributedDataParallel(
                run.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            run.framework.student = self.model
        self.labeled_iter = iter(run.labeled_loader(self.start_step))
        # Supervised warm-up steps read no unlabeled batch: the unlabeled stream starts at the first
        # semi-supervised step, and as the sampler is indexed by step, step t still gets batch t.
        self.sup_only = cfg.train.sup_only_steps
        self.unlabeled_iter = (iter(run.unlabeled_loader(max(self.start_step, self.sup_only)))
                               if run.framework.uses_unlabeled else None)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                       enabled=cfg.train.bf16 and self.device.type == "cuda")
        self.acc: dict[str, list[torch.Tensor]] = defaultdict(list)  # since the last log point
        self.pl_acc: dict[str, list[torch.Tensor]] = defaultdict(list)  # since the last evaluation
        self.train_time, self.t0 = 0.0, time.perf_counter()
        self.data_time, self.first_step_s = 0.0, math.nan  # summary: data_wait_frac, first_step_s
        self.bar = tqdm(total=self.total, initial=self.start_step, desc=cfg.run.name,
                        disable=not (cfg.train.progress and self.is_main), dynamic_ncols=True, leave=True)

    def step(self, step: int) -> None:
        cfg, run = self.cfg, self.run
        t_step = time.perf_counter()
        lr = poly_lr(cfg.train.lr, step, self.total, cfg.train.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        warm_up = step < self.sup_only
        t_data = time.perf_counter()
        labeled = _to(next(self.labeled_iter), self.device)
        unlabeled = (_to(next(self.unlabeled_iter), self.device)
                     if self.unlabeled_iter is not None and not warm_up else None)
        self.data_time += time.perf_counter() - t_data  # host time blocked on the data path
        # Seeded after fetching: a DataLoader draws from the global RNG when its iterator starts,
        # which happens at a different step in a resumed run.
        generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, stream=1))
        torch.manual_seed(step_seed(cfg.train.seed, step, stream=2))  # dropout, feature perturbation
        self.model.train()
        with self.autocast:
            # Warm-up (train.sup_only_steps): supervised loss alone, no teacher forward and no
            # pseudo-labels, so this step logs no pl/* keys; the EMA teacher still follows below.
            result = (run.framework.supervised_step(labeled) if warm_up
                      else run.framework.step(labeled, unlabeled, step / self.total, generator))
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        if run.teacher is not None:
            ema_update(run.teacher, run.student, step, cfg.host.ema_decay)
        for key, value in result.metrics.items():
            (self.pl_acc if key.startswith("pl/") else self.acc)[key].append(value)
            if key.startswith("pl/"):
                self.acc[key].append(value)
        self.train_time += time.perf_counter() - t_step
        if step == self.start_step:  # includes torch.compile's compilation with train.compile
            self.first_step_s = time.perf_counter() - t_step
        done = step + 1
        self.bar.update(1)
        if done % cfg.train.log_every == 0 or done == self.total:
            self.log(done, lr)
        if done % cfg.train.eval_every == 0 or done == self.total:
            self.evaluate(done)

    def log(self, done: int, lr: float) -> None:
        row = {k: torch.stack(v).float().nanmean().item() for k, v in self.acc.items()}
        row["train/lr"] = lr
        self.acc.clear()
        if not math.isfinite(row.get("train/loss", 0.0)):
            raise FloatingPointError(f"train/loss is {row['train/loss']} at step {done}; "
                                     "lower train.lr or check the data")
        self.bar.set_postfix({"loss": f"{row.get('train/loss', math.nan):.3f}",
                              "plq": f"{row.get('pl/quantity', math.nan):.2f}"}, refresh=False)
        if self.writer is not None:
            self.writer.on_step(done, row)
        self.cbs.on_step(done, row)

    def evaluate(self, done: int) -> None:
        run = self.run
        # eval.model resolved (teacher or student): this metric also picks best.pt.
        metrics = run.evaluate(run.eval_network)
        metrics["eval/model_is_teacher"] = float(run.eval_model == "teacher")
        metrics.update({k: torch.stack(v).float().nanmean().item() for k, v in self.pl_acc.items()})
        self.pl_acc.clear()
        metrics["train/time_s"] = self.train_time
        is_best = metrics["eval/mIoU"] > self.best_miou
        if is_best:
            self.best_miou, self.best_step = metrics["eval/mIoU"], done
        self.history.append({"step": done, **metrics})
        if self.is_main:
            save_samples(self.run_dir / "samples" / f"step_{done:08d}.png", run)
            self.bar.write(_eval_line(done, self.total, metrics))
            # The row goes to disk before the checkpoint: a crash in between replays this eval
            # (rows after the resumed step are dropped), never loses it.
            self.writer.on_eval(done, metrics)
            # Checkpoint before the callbacks see the metrics: a Ray report or an early stop
            # raised from on_eval then always has a checkpoint of this step behind it.
            path = save_checkpoint(self.ckpt_dir, done, {
                "step": done, "total_steps": self.total, "student": run.student.state_dict(),
                "teacher": run.teacher.state_dict() if run.teacher is not None else None,
                "optimizer": self.optimizer.state_dict(), "best_miou": self.best_miou,
                "best_step": self.best_step, "history": self.history, "config": to_yaml(self.cfg)},
                is_best, self.cfg.train.keep_checkpoints)
            self.cbs.on_checkpoint(done, path, is_best)
        self.cbs.on_eval(done, metrics)

    def summary(self, step: int, stopped: bool) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "steps": step + 1 if self.total else 0, "total_steps": self.total,
                "stopped_early": stopped, "eval_model": self.run.eval_model,
                "best/eval/mIoU": self.best_miou, "best/step": self.best_step,
                "final": self.history[-1] if self.history else {}, "train_time_s": self.train_time,
                "wall_time_s": time.perf_counter() - self.t0,
                "steps_per_s": (step + 1 - self.start_step) / max(self.train_time, 1e-9),
                "data_wait_frac": self.data_time / max(self.train_time, 1e-9), "first_step_s": self.first_step_s,
                "startup_s": self.startup_s}


def run_training(cfg: DictConfig, run_dir: str | Path | None = None, callbacks=(), resume: bool = True
                 ) -> dict[str, Any]:
    """Trains one run described by `cfg`; returns the summary also written to summary.json."""
    loop = _Loop(cfg, Path(run_dir or cfg.run.dir).absolute(), callbacks, resume)
    stopped, step = False, loop.start_step
    try:
        for step in range(loop.start_step, loop.total):
            loop.step(step)
    except StopTraining:
        stopped = True
    finally:
        loop.bar.close()
    summary = loop.summary(step, stopped)
    if loop.is_main:
        (loop.run_dir / "summary.json").write_text(_json(summary))
        if cfg.train.progress:
            print_summary(summary, loop.run.class_names)
    loop.cbs.on_train_end(summary)
    return summary


def _eval_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"[eval {step}/{total}] mIoU {m['eval/mIoU']:.2f}"]
    for key in ("pl/quantity", "pl/quality"):
        if key in m:
            parts.append(f"{key} {m[key]:.3f} (no refine {m.get(key + '_no_refine', math.nan):.3f})")
    return " | ".join(parts)


def _json(obj: Any) -> str:
    import json

    def default(o):
        return float(o) if hasattr(o, "__float__") else str(o)
    return json.dumps(obj, indent=2, default=default, allow_nan=True)
