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




def run_training(cfg: DictConfig, run_dir: str | Path | None = None, callbacks=(), resume: bool = True
                 ) -> dict[str, Any]:
    """Trains one run described by `cfg`; returns the summary also written to summary.json."""
    run_dir = Path(run_dir or cfg.run.dir).absolute()
    ckpt_dir = run_dir / "checkpoints"
    rank = dist.get_rank() if dist.is_initialized() else 0
    is_main = rank == 0
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())

    run = build_run(cfg, device)
    total = run.total_steps
    optimizer = run.optimizer
    start_step, best_miou, best_step, history = 0, -math.inf, -1, []
    last = ckpt_dir / "last.pt"
    if resume and last.exists():
        state = load_checkpoint(last, map_location=device)
        if int(state["total_steps"]) != total:
            raise ValueError(f"checkpoint {last} was made for {state['total_steps']} steps but the config "
                             f"asks for {total}; use a new run.dir or the same schedule")
        run.student.load_state_dict(state["student"])
        if run.teacher is not None:
            run.teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step, best_miou, best_step = state["step"], state["best_miou"], state["best_step"]
        history = state["history"]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        write_versions(run_dir / "versions.json", device, run.pretrained_path)
    writer = MetricsWriter(run_dir, resume_step=start_step) if is_main else None
    cbs = CallbackList(list(callbacks))
    cbs.on_train_start({"run_dir": str(run_dir), "total_steps": total, "start_step": start_step,
                        "num_params": sum(p.numel() for p in run.student.parameters()), "rank": rank,
                        "device": str(device)})

    model = run.student
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(
            run.student, device_ids=[device.index] if device.type == "cuda" else None)
        run.framework.student = model
    labeled_iter = iter(run.labeled_loader(start_step))
    # Supervised warm-up steps read no unlabeled batch: the unlabeled stream starts at the first
    # semi-supervised step, and as the sampler is indexed by step, step t still gets batch t.
    sup_only = cfg.train.sup_only_steps
    unlabeled_iter = (iter(run.unlabeled_loader(max(start_step, sup_only)))
                      if run.framework.uses_unlabeled else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.bf16 and device.type == "cuda")
    acc: dict[str, list[torch.Tensor]] = defaultdict(list)  # since the last log point
    pl_acc: dict[str, list[torch.Tensor]] = defaultdict(list)  # since the last evaluation
    train_time, t0 = 0.0, time.perf_counter()
    bar = tqdm(total=total, initial=start_step, desc=cfg.run.name, disable=not (cfg.train.progress and is_main),
               dynamic_ncols=True, leave=True)
    stopped = False
    step = start_step
    try:
        for step in range(start_step, total):
            t_step = time.perf_counter()
            lr = poly_lr(cfg.train.lr, step, total, cfg.train.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            warm_up = step < sup_only
            labeled = _to(next(labeled_iter), device)
            unlabeled = _to(next(unlabeled_iter), device) if unlabeled_iter is not None and not warm_up else None
            # Seeded after fetching: a DataLoader draws from the global RNG when its iterator starts,
            # which happens at a different step in a resumed run.
            generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, stream=1))
            torch.manual_seed(step_seed(cfg.train.seed, step, stream=2))  # dropout, feature perturbation
            model.train()
            with autocast:
                # Warm-up (train.sup_only_steps): supervised loss alone, no teacher forward and no
                # pseudo-labels, so this step logs no pl/* keys; the EMA teacher still follows below.
                result = (run.framework.supervised_step(labeled) if warm_up
                          else run.framework.step(labeled, unlabeled, step / total, generator))
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            if run.teacher is not None:
                ema_update(run.teacher, run.student, step, cfg.host.ema_decay)
            for key, value in result.metrics.items():
                (pl_acc if key.startswith("pl/") else acc)[key].append(value)
                if key.startswith("pl/"):
                    acc[key].append(value)
            train_time += time.perf_counter() - t_step
            done = step + 1
            bar.update(1)
            if done % cfg.train.log_every == 0 or done == total:
                row = {k: torch.stack(v).float().nanmean().item() for k, v in acc.items()}
                row["train/lr"] = lr
                acc.clear()
                if not math.isfinite(row.get("train/loss", 0.0)):
                    raise FloatingPointError(f"train/loss is {row['train/loss']} at step {done}; "
                                             "lower train.lr or check the data")
                bar.set_postfix({"loss": f"{row.get('train/loss', math.nan):.3f}",
                                 "plq": f"{row.get('pl/quantity', math.nan):.2f}"}, refresh=False)
                if writer is not None:
                    writer.on_step(done, row)
                cbs.on_step(done, row)
            if done % cfg.train.eval_every == 0 or done == total:
                # eval.model resolved (teacher or student): this metric also picks best.pt.
                metrics = run.evaluate(run.eval_network)
                metrics["eval/model_is_teacher"] = float(run.eval_model == "teacher")
                metrics.update({k: torch.stack(v).float().nanmean().item() for k, v in pl_acc.items()})
                pl_acc.clear()
                metrics["train/time_s"] = train_time
                is_best = metrics["eval/mIoU"] > best_miou
                if is_best:
                    best_miou, best_step = metrics["eval/mIoU"], done
                history.append({"step": done, **metrics})
                if is_main:
                    save_samples(run_dir / "samples" / f"step_{done:08d}.png", run)
                    bar.write(_eval_line(done, total, metrics))
                    # The row goes to disk before the checkpoint: a crash in between replays this eval
                    # (rows after the resumed step are dropped), never loses it.
                    writer.on_eval(done, metrics)
                    # Checkpoint before the callbacks see the metrics: a Ray report or an early stop
                    # raised from on_eval then always has a checkpoint of this step behind it.
                    path = save_checkpoint(ckpt_dir, done, {
                        "step": done, "total_steps": total, "student": run.student.state_dict(),
                        "teacher": run.teacher.state_dict() if run.teacher is not None else None,
                        "optimizer": optimizer.state_dict(), "best_miou": best_miou, "best_step": best_step,
                        "history": history, "config": to_yaml(cfg)}, is_best, cfg.train.keep_checkpoints)
                    cbs.on_checkpoint(done, path, is_best)
                cbs.on_eval(done, metrics)
    except StopTraining:
        stopped = True
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    final = history[-1] if history else {}
    summary = {"run_dir": str(run_dir), "steps": step + 1 if total else 0, "total_steps": total,
               "stopped_early": stopped, "eval_model": run.eval_model,
               "best/eval/mIoU": best_miou, "best/step": best_step,
               "final": final, "train_time_s": train_time, "wall_time_s": wall,
               "steps_per_s": (step + 1 - start_step) / max(train_time, 1e-9)}
    if is_main:
        (run_dir / "summary.json").write_text(_json(summary))
        if cfg.train.progress:
            print_summary(summary, run.class_names)
    cbs.on_train_end(summary)
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
