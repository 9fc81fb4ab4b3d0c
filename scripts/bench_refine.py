"""Benchmark: refinement + DPA (the whole pseudo-labelling call) as a fraction of one training step.

Not a test: it prints measured times and ratios. For each neighbourhood it times the
`PseudoLabeler` call (refinement, DPA quantile, and the with/without-refinement statistics) on
teacher probabilities of the configured shape, and one full training step of the configured host
with S4MC on (data, forward, backward, optimizer, EMA). Run on CPU by default; `--device cuda`
on a GPU machine.

  python scripts/bench_refine.py                                  # embedded default, CPU
  python scripts/bench_refine.py --config experiments/embedded/unimatch_s4mc.yaml
  python scripts/bench_refine.py --device cuda data.crop_size=321 model.backbone=resnet101 model.width=1 \
      model.head_channels=256 data.embedded.image_size=321
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from s4mc.config import load_config
from s4mc.train.build import build_pseudo_labeler, build_run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/embedded/cutmix_seg_s4mc.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides + [f"train.device={args.device}", "train.progress=false"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device(args.device)
    run = build_run(cfg, device)
    labeled = {k: v.to(device) for k, v in next(iter(run.labeled_loader(0))).items()}
    unlabeled = {k: v.to(device) for k, v in next(iter(run.unlabeled_loader(0))).items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.bf16)

    def train_step():
        run.student.train()
        with autocast:
            result = run.framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
        run.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        run.optimizer.step()

    step_s = timed(train_step, device, args.repeats)
    with torch.no_grad():
        probs = run.student.eval()(unlabeled["weak"]).float().softmax(1)
    valid, gt = unlabeled["valid"], unlabeled["gt"]
    rows = []
    for hood in ("4", "3x3", "5x5", "7x7"):
        c = load_config(args.config, args.overrides + [f"s4mc.neighbourhood={hood}"])
        labeler = build_pseudo_labeler(c, None)
        pl_s = timed(lambda labeler=labeler: labeler(probs, valid, 0.1, gt=gt), device, args.repeats)
        rows.append({"neighbourhood": hood, "pseudo_label_ms": pl_s * 1e3, "fraction_of_step": pl_s / step_s})
    b, ncls, h, w = probs.shape
    print(f"device {device} ({torch.get_num_threads()} threads) | host {cfg.host.name} | model "
          f"{cfg.model.backbone} x{cfg.model.width} | teacher probs {b}x{ncls}x{h}x{w}")
    print(f"one training step (median of {args.repeats}): {step_s * 1e3:.1f} ms")
    print(f"{'neighbourhood':>13} | {'refine+DPA+stats ms':>19} | fraction of a step")
    for r in rows:
        print(f"{r['neighbourhood']:>13} | {r['pseudo_label_ms']:>19.2f} | {r['fraction_of_step']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "step_ms": step_s * 1e3, "shape": [b, ncls, h, w],
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
