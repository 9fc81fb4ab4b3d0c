"""The prepared GPU check of docs/performance.md: S4MC's cost at the published scale, in one run.

For DeepLabV3+ ResNet-101 (deep stem, OS16, ASPP 6/12/18, 21 classes) at crop 321 and 513, batch
8 labeled + 8 unlabeled, bf16 autocast, channels_last and the fused optimizer (the trainer's CUDA
defaults), it measures and prints:
- that the CUDA pseudo-labels (refinement, DPA, statistics) equal the CPU result bit for bit, on the
  teacher's own probabilities, for every neighbourhood;
- per host with S4MC on (cutmix_seg, fixmatch, unimatch): training images/s (labeled + unlabeled),
  peak memory, and the refinement + DPA + statistics call as a fraction of a step;
- the same probabilities through our re-implementations of the two released formulations
  (scripts/bench_released.py), whose host copies are synchronisations here;
- the model FLOPs of one step (forward + backward, counted by torch.utils.flop_counter) and the MFU
  against the device's dense bf16 peak (PEAK_BF16_TFLOPS, sources in docs/performance.md).
Synthetic inputs on the device: the data path is measured by scripts/bench_refine.py, not here.
Random weights: speed does not depend on them. --tiny runs the same code on CPU with tiny shapes
(ResNet-18 x0.125, crop 32 / 48, batch 2 + 2) so that CI keeps it working (tests/test_gpu_check.py).

  scripts/gpu_check.sh                     # on a GPU host: ~2-4 minutes, writes docs/gpu_check.json
  python scripts/gpu_check.py --tiny --json /tmp/gpu_check_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import bench_released
import torch
from bench_refine import make_step, timed_many
from torch.utils.flop_counter import FlopCounterMode

from s4mc.config import load_config
from s4mc.frameworks.hosts import HOSTS, UniMatch
from s4mc.models import build_model
from s4mc.refine import NEIGHBOURHOODS, refine
from s4mc.train.build import build_pseudo_labeler, optimizer_kernels, prepare_networks, resolve_student_photometric

HOSTS_WITH_S4MC = ("cutmix_seg", "fixmatch", "unimatch")
NUM_CLASSES = 21  # Pascal VOC
# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from NVIDIA's data sheets (docs/performance.md).
# Matched in order against torch.cuda.get_device_name(): the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
FULL = {"backbone": "resnet101", "width": 1.0, "deep_stem": True, "head_channels": 256, "crops": (321, 513),
        "batch": 8, "warmup": 3, "steps": 10}
TINY = {"backbone": "resnet18", "width": 0.125, "deep_stem": True, "head_channels": 16, "crops": (32, 48),
        "batch": 2, "warmup": 1, "steps": 2}


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def build(host: str, shape: dict, device: torch.device):
    """(framework, optimizer, cfg) the way build_run wires them, without building a data set."""
    cfg = load_config(overrides=[f"host.name={host}", f"train.device={device.type}", "model.output_stride=16"])
    model = build_model(backbone=shape["backbone"], num_classes=NUM_CLASSES, width=shape["width"],
                        deep_stem=shape["deep_stem"], output_stride=16, head_channels=shape["head_channels"])
    host_cls = HOSTS[host]
    student, teacher = prepare_networks(model.to(device), host_cls.uses_ema_teacher, cfg, device)
    c = cfg.train
    optimizer = torch.optim.SGD(student.param_groups(c.lr, c.head_lr_mult, c.weight_decay), lr=c.lr,
                                momentum=c.momentum, weight_decay=c.weight_decay,
                                **optimizer_kernels(c.optimizer_impl, device))
    h = cfg.host
    kwargs = {"unsup_weight": h.unsup_weight, "cutmix_prob": h.cutmix_prob, "teacher": teacher,
              "student_photometric": resolve_student_photometric(cfg), "cutmix_partner": h.cutmix_partner}
    if host_cls is UniMatch:
        kwargs.update(w_s1=h.w_s1, w_s2=h.w_s2, w_fp=h.w_fp, loss_scale=h.loss_scale)
    return host_cls(student, build_pseudo_labeler(cfg, None), **kwargs), optimizer, cfg


def batches(batch: int, crop: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cl = device.type == "cuda"  # the trainer's channels_last: NHWC inputs too

    def image():
        x = torch.randn(batch, 3, crop, crop, generator=g).to(device)
        return x.contiguous(memory_format=torch.channels_last) if cl else x
    mask = torch.randint(0, NUM_CLASSES, (batch, crop, crop), generator=g).to(device)
    valid = torch.ones(batch, crop, crop, dtype=torch.bool)
    valid[:, :, -crop // 8:] = False  # crop padding, as a resized image leaves it
    labeled = {"image": image(), "mask": mask}
    unlabeled = {"weak": image(), "strong1": image(), "strong2": image(), "valid": valid.to(device),
                 "gt": torch.randint(0, NUM_CLASSES, (batch, crop, crop), generator=g).to(device)}
    return labeled, unlabeled


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after warm-up (the bench's timer, one function)."""
    return timed_many({"fn": fn}, device, repeats, warmup)["fn"]["median_ms"] / 1e3


def teacher_probs(framework, unlabeled, device) -> torch.Tensor:
    net = framework.teacher if framework.teacher is not None else framework.student
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return net.eval()(unlabeled["weak"]).softmax(1).float()


def equality_check(framework, unlabeled, device) -> dict[str, bool]:
    """CUDA vs CPU bits of refine (every neighbourhood) and of the whole pseudo-labelling call; on a
    CPU-only host the fast path is compared with the general path instead."""
    probs, valid, gt = teacher_probs(framework, unlabeled, device), unlabeled["valid"], unlabeled["gt"]
    out = {}
    for hood in NEIGHBOURHOODS:
        a = refine(probs, valid=valid, neighbourhood=hood)
        b = (refine(probs.cpu(), valid=valid.cpu(), neighbourhood=hood) if device.type == "cuda"
             else refine(probs, valid=valid, neighbourhood=hood, _force_general=True))
        out[f"refine_{hood}"] = bool(torch.equal(a.cpu(), b.cpu()))
    labeler = framework.pseudo_labeler
    on_dev = labeler(probs, valid, 0.3, gt=gt)
    on_cpu = labeler(probs.cpu(), valid.cpu(), 0.3, gt=gt.cpu())
    same = torch.equal(on_dev.label.cpu(), on_cpu.label) and torch.equal(on_dev.keep.cpu(), on_cpu.keep)
    for key, value in on_cpu.stats.items():
        d = on_dev.stats[key].cpu()
        same = same and (torch.equal(d, value) or bool(d.isnan() and value.isnan()))
    out["pseudo_label_call"] = bool(same)
    return out


def bandwidth(probs: torch.Tensor, valid: torch.Tensor, pl_s: float, device) -> dict[str, float]:
    """The memory-bandwidth limit of the pseudo-labelling call (as scripts/bench_refine.py): bytes it
    must read (probs, valid, gt int64) and write (label int64, keep), against a plain copy moving as
    many bytes."""
    n_px = valid.numel()
    state = probs.numel() * probs.element_size() + n_px + 8 * n_px + 8 * n_px + n_px
    src = torch.empty(state // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, 3, 20)
    return {"state_MB": state / 1e6, "copy_GBps": state / copy_s / 1e9, "limit_ms": copy_s * 1e3,
            "pseudo_label_over_limit": pl_s / copy_s}


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def measure(host: str, crop: int, shape: dict, device: torch.device, peak: float | None) -> dict:
    framework, optimizer, cfg = build(host, shape, device)
    labeled, unlabeled = batches(shape["batch"], crop, device)
    # The bench's step (bf16 autocast on CUDA by cfg.train.bf16, the EMA update of mean-teacher hosts):
    # the trainer's step, whose throughput the check reports.
    step = make_step(framework, optimizer, cfg, labeled, unlabeled, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(step, device, shape["warmup"], shape["steps"])
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    probs = teacher_probs(framework, unlabeled, device)
    pl = framework.pseudo_labeler
    pl_s = timed(lambda: pl(probs, unlabeled["valid"], 0.3, gt=unlabeled["gt"]), device, 2, shape["steps"])
    cooc = torch.full((NUM_CLASSES,), 0.9, device=device)
    released = {  # scripts/bench_released.py, the same tensors (docs/performance.md)
        "class_agnostic_cpu_quantile_ms": 1e3 * timed(
            lambda: bench_released.class_agnostic(probs, unlabeled["valid"], 0.3, unlabeled["gt"]), device, 1, 3),
        "u2pl_4_expected_np_percentile_ms": 1e3 * timed(
            lambda: bench_released.u2pl_expected(probs, unlabeled["valid"], 0.3, unlabeled["gt"], cooc),
            device, 1, 3)}
    flops = count_flops(step)
    row = {"host": host, "crop": crop, "batch": f"{shape['batch']}+{shape['batch']}", "step_ms": step_s * 1e3,
           "img_per_s": 2 * shape["batch"] / step_s, "peak_mem_GiB": None if peak_mem is None else peak_mem / 2**30,
           "pseudo_label_ms": pl_s * 1e3, "pseudo_label_frac": pl_s / step_s, "flops_per_step": flops,
           "achieved_TFLOPs": flops / step_s / 1e12,
           "mfu": None if peak is None else flops / step_s / (peak * 1e12),
           "bandwidth": bandwidth(probs, unlabeled["valid"], pl_s, device), "released": released}
    del framework, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes (CI)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--hosts", nargs="*", default=list(HOSTS_WITH_S4MC))
    args = p.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape = TINY if device.type == "cpu" else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name) if device.type == "cuda" else None
    torch.manual_seed(0)
    res = {"device": name, "torch": torch.__version__, "peak_bf16_TFLOPs": peak, "shape": shape,
           "loadavg": os.getloadavg(), "rows": []}
    framework, _, _ = build("cutmix_seg", shape, device)
    res["cuda_equals_cpu" if device.type == "cuda" else "fast_equals_general"] = equality_check(
        framework, batches(shape["batch"], max(shape["crops"]), device)[1], device)
    del framework
    for crop in shape["crops"]:
        for host in args.hosts:
            res["rows"].append(measure(host, crop, shape, device, peak))
            res["wall_s"] = time.perf_counter() - t_start
            if args.json:  # after every row: a run cut off by the 5-minute timeout keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2)
    report(res)


def report(res: dict) -> None:
    print(f"device {res['device']} | torch {res['torch']} | bf16 peak {res['peak_bf16_TFLOPs']} TFLOPS | "
          f"wall {res['wall_s']:.0f} s")
    checks = res.get("cuda_equals_cpu") or res.get("fast_equals_general")
    print("bit-identical:", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))
    print(f"{'host':>10} {'crop':>5} {'img/s':>8} {'step ms':>8} {'peak GiB':>8} {'PL ms':>7} {'PL frac':>8} "
          f"{'PL/limit':>8} {'GFLOP/step':>11} {'MFU':>6}")
    for r in res["rows"]:
        mem = "-" if r["peak_mem_GiB"] is None else f"{r['peak_mem_GiB']:.1f}"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.3f}"
        print(f"{r['host']:>10} {r['crop']:>5} {r['img_per_s']:>8.1f} {r['step_ms']:>8.1f} {mem:>8} "
              f"{r['pseudo_label_ms']:>7.2f} {r['pseudo_label_frac']:>8.4f} "
              f"{r['bandwidth']['pseudo_label_over_limit']:>8.1f} {r['flops_per_step'] / 1e9:>11.1f} {mfu:>6}")


if __name__ == "__main__":
    main()
