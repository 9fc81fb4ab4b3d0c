"""Benchmark: refinement + DPA + statistics against one training step, part by part (docs/performance.md).

Not a test: it prints measured times and ratios and, with --json, writes them. In one run:
- one full training step of the configured host with S4MC on (data already fetched; forward,
  backward, optimizer, EMA) and the time the data path takes to deliver one labeled + unlabeled pair;
- the `PseudoLabeler` call for each neighbourhood, and for 3x3 each of its parts; the general path
  (k = 2, expected joint, decaying weights) as the default sweep samples it;
- the same tensors through our re-implementations of the two released formulations
  (scripts/bench_released.py);
- the memory-bandwidth limit: the bytes the pseudo-labelling must read and write, and a plain copy
  moving the same number of bytes;
- the 3x3 call both ways on CPU: through the fused C kernel (the default there, s4mc/fused_cpu.py; its
  portable body too where the AVX-512 one is built),
  with its scan / DPA selection / counting phases, and eager (s4mc.cpu_kernel=eager);
- with --step-options: the step with each optimizer kernel, channels_last, and (with --compile)
  torch.compile, whose compile time is reported on its own.
Every time is the minimum and the median of --repeats runs after warm-up; the load average (uptime)
before and after goes into the JSON, since the machine may be shared.

  python scripts/bench_refine.py --json docs/bench_refine_cpu.json --step-options   # CPU, 1 thread
  python scripts/bench_refine.py --device cuda data.crop_size=321 ...               # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time

import bench_released
import torch

from s4mc import fused_cpu
from s4mc.confidence import confidence, label_and_confidence
from s4mc.config import load_config
from s4mc.frameworks.base import ema_update
from s4mc.refine import refine
from s4mc.threshold import dpa_threshold
from s4mc.train.build import build_pseudo_labeler, build_run, optimizer_kernels

NEIGHBOURHOODS = ("4", "3x3", "5x5", "7x7")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_many(fns: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """{name: {"min_ms", "median_ms"}} of each fn(), the fns interleaved round by round so that a
    change of load on a shared machine hits all of them alike, in a new (seeded) random order each
    round so that no fn always runs after the same one: a predecessor that frees a lot of memory
    makes the next fn pay page faults and cold caches. The minimum is the least disturbed figure;
    the median shows how much the others disturbed it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    items, rng = list(fns.items()), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(items)
        for name, fn in items:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"min_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3} for name, t in times.items()}


def make_step(framework, optimizer, cfg, labeled, unlabeled, device):
    """One training step as the trainer runs it: forward(s), backward, optimizer, EMA."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.bf16)

    def train_step():
        framework.student.train()
        with autocast:
            result = framework.step(labeled, unlabeled, 0.1, torch.Generator().manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        if framework.teacher is not None:
            ema_update(framework.teacher, framework.student, 10, cfg.host.ema_decay)
    return train_step


def make_fetch(run, device):
    """The data path delivering one labeled + unlabeled batch pair on the device."""
    lab, unl = iter(run.labeled_loader(0)), iter(run.unlabeled_loader(0))

    def fetch():
        for it in (lab, unl):
            {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
    return fetch


def pl_fns(cfg, overrides, probs, valid, gt, device) -> tuple[dict, list]:
    """The PseudoLabeler call per neighbourhood, the 3x3 call eager and fused (with the list the fused
    calls fill with their phase times), the parts of the eager 3x3 call, and the released ones."""
    fns = {}
    for hood in NEIGHBOURHOODS:
        labeler = build_pseudo_labeler(load_config(cfg, overrides + [f"s4mc.neighbourhood={hood}"]), None)
        fns[f"pl_{hood}"] = lambda labeler=labeler: labeler(probs, valid, 0.1, gt=gt)
    cooc = torch.full((probs.shape[1],), 0.9, device=device)  # E_c for the expected joint
    # The general path (k > 1, decaying weights, the expected joint), which the default sweep samples.
    for hood in ("4", "3x3", "5x5"):
        general = [f"s4mc.neighbourhood={hood}", "s4mc.k=2", "s4mc.joint=expected"]
        general += [] if hood == "4" else ["s4mc.beta=decay"]
        labeler = build_pseudo_labeler(load_config(cfg, overrides + general), cooc)
        fns[f"pl_{hood}_k2_expected{'' if hood == '4' else '_decay'}"] = (
            lambda labeler=labeler: labeler(probs, valid, 0.1, gt=gt))
    eager = build_pseudo_labeler(load_config(cfg, overrides + ["s4mc.neighbourhood=3x3", "s4mc.cpu_kernel=eager"]),
                                 None)
    fns["pl_3x3_eager"] = lambda: eager(probs, valid, 0.1, gt=gt)
    phases = []
    fused = build_pseudo_labeler(load_config(cfg, overrides + ["s4mc.neighbourhood=3x3"]), None)
    fused(probs, valid, 0.1, gt=gt)  # builds the kernel where it applies
    if fused._fused is not None:
        def fused_call():
            fused(probs, valid, 0.1, gt=gt)
            phases.append(fused._fused.phase_s.tolist())
        fns["pl_3x3_fused_phases"] = fused_call
        if fused._fused.variant == "avx512":  # what a CPU without AVX-512 runs, on the same tensors
            portable = build_pseudo_labeler(load_config(cfg, overrides + ["s4mc.neighbourhood=3x3"]), None)
            portable._fused = fused_cpu.FusedPseudoLabel(fused_cpu.load(portable=True))
            fns["pl_3x3_fused_portable"] = lambda: portable(probs, valid, 0.1, gt=gt)
    kind = load_config(cfg, overrides).s4mc.confidence
    _, kappa = label_and_confidence(probs, kind)
    refined = refine(probs, valid=valid)
    fns.update({
        "part_label_and_confidence": lambda: label_and_confidence(probs, kind),
        "part_dpa_quantile": lambda: dpa_threshold(kappa, valid, 0.36),
        "part_refine": lambda: refine(probs, valid=valid),
        "part_refined_confidence": lambda: confidence(refined, kind),
        "released_class_agnostic_cpu_quantile": lambda: bench_released.class_agnostic(probs, valid, 0.36, gt),
        "released_u2pl_4_expected_np_percentile": lambda: bench_released.u2pl_expected(probs, valid, 0.36, gt,
                                                                                       cooc),
    })
    return fns, phases, (fused._fused.variant if fused._fused is not None else None)


def bandwidth_limit(probs, valid, gt, device, repeats) -> dict[str, float]:
    """Bytes the call must move at least: read probs, valid and gt once, write label (int64) and keep;
    the bandwidth of a plain copy that moves as many bytes (reads half of them, writes half)."""
    n_px = valid.numel()
    read = probs.numel() * probs.element_size() + valid.numel() + gt.numel() * gt.element_size()
    written = n_px * 8 + n_px
    state = read + written
    src = torch.empty(state // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = timed_many({"copy": lambda: dst.copy_(src)}, device, max(repeats, 50))["copy"]["min_ms"]
    bw = state / (copy_ms / 1e3)
    return {"bytes_read": read, "bytes_written": written, "state_bytes": state,
            "copy_ms": copy_ms, "bandwidth_GBps": bw / 1e9, "limit_ms": state / bw * 1e3}


def _variant(run, device, impl: str, channels_last: bool = False):
    """A copy of the run's framework (student, teacher, labeler) with its own optimizer."""
    framework = copy.deepcopy(run.framework)
    if channels_last:
        for net in (framework.student, framework.teacher):
            if net is not None:
                net.to(memory_format=torch.channels_last)
    c = run.cfg.train
    groups = framework.student.param_groups(c.lr, c.head_lr_mult, c.weight_decay)
    opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                          **optimizer_kernels(impl, device))
    return framework, opt


def step_options(run, labeled, unlabeled, device, repeats, compile_too: bool) -> dict[str, dict]:
    """The step with each optimizer kernel, with channels_last, and (opt-in) compiled, interleaved."""
    fns = {}
    for name, impl, cl in (("optimizer_for_loop", "for_loop", False), ("optimizer_foreach", "foreach", False),
                           ("optimizer_fused", "fused", False), ("channels_last_foreach", "foreach", True)):
        fw, opt = _variant(run, device, impl, cl)
        fns[name] = make_step(fw, opt, run.cfg, labeled, unlabeled, device)
    for impl in ("for_loop", "foreach", "fused"):  # the optimizer step alone, on the same gradients
        fw, opt = _variant(run, device, impl)
        for p in fw.student.parameters():
            p.grad = torch.randn_like(p)
        fns[f"optimizer_step_only_{impl}"] = opt.step
    first_s = None
    if compile_too:
        fw, opt = _variant(run, device, "foreach")
        for net in (fw.student, fw.teacher):
            if net is not None:
                net.compile()
        fns["compiled_foreach"] = make_step(fw, opt, run.cfg, labeled, unlabeled, device)
        t0 = time.perf_counter()
        fns["compiled_foreach"]()  # compiles (train and eval graphs); later calls reuse them
        _sync(device)
        first_s = time.perf_counter() - t0
    out = timed_many(fns, device, repeats)
    if first_s is not None:
        out["compiled_foreach"]["first_step_s"] = first_s
    return out


def cpu_model() -> str | None:
    """The CPU's model name, family and model number from /proc/cpuinfo (Linux), for comparing runs
    across machines (a VM may name only "AMD EPYC"): the same kernel's DPA selection took 0.013 ms
    on one session's machine and 0.059 ms on the next's (docs/performance.md)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key:  # the end of the first processor's block
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        return None
    name = fields.get("model name")
    if name and "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/embedded/cutmix_seg_s4mc.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--step-options", action="store_true", help="also time optimizer kernels / channels_last")
    p.add_argument("--compile", action="store_true", help="with --step-options: also torch.compile (slow)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    load_before = os.getloadavg()
    cfg = load_config(args.config, args.overrides + [f"train.device={args.device}", "train.progress=false"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device(args.device)
    run = build_run(cfg, device)
    labeled = {k: v.to(device) for k, v in next(iter(run.labeled_loader(0))).items()}
    unlabeled = {k: v.to(device) for k, v in next(iter(run.unlabeled_loader(0))).items()}
    res: dict = {"device": str(device), "cpu": cpu_model(), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "config": args.config, "overrides": args.overrides,
                 "repeats": args.repeats}
    steps = max(5, args.repeats // 2)
    step_fn = make_step(run.framework, run.optimizer, cfg, labeled, unlabeled, device)
    t = timed_many({"step": step_fn, "data_fetch": make_fetch(run, device)}, device, steps)
    res.update(t)
    fetch, step = res["data_fetch"]["min_ms"], res["step"]["min_ms"]
    res["data_wait_frac"] = fetch / (fetch + step)  # with num_workers=0 the step waits for all of it
    with torch.no_grad():
        probs = run.teacher.eval()(unlabeled["weak"]).float().softmax(1)
    valid, gt = unlabeled["valid"], unlabeled["gt"]
    res["shape"] = list(probs.shape)
    fns, phases, res["fused_variant"] = pl_fns(args.config, args.overrides, probs, valid, gt, device)
    res["pseudo_label"] = timed_many(fns, device, args.repeats)
    if phases:  # the least of each phase over the timed calls, like every other figure here
        res["fused_phases_min_ms"] = {name: min(p[i] for p in phases) * 1e3
                                            for i, name in enumerate(("scan", "dpa_selection", "counting"))}
    res["bandwidth"] = bandwidth_limit(probs, valid, gt, device, args.repeats)
    if args.step_options:
        res["step_options"] = step_options(run, labeled, unlabeled, device, steps, args.compile)
    res["loadavg_before"], res["loadavg_after"] = load_before, os.getloadavg()
    report(res, cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def report(res: dict, cfg) -> None:
    b, c, h, w = res["shape"]
    step = res["step"]["min_ms"]
    cpu = res.get("cpu") or "CPU model unknown"
    print(f"device {res['device']} ({res['threads']} threads; {cpu}) | host {cfg.host.name} | model "
          f"{cfg.model.backbone} x{cfg.model.width} | teacher probs {b}x{c}x{h}x{w} | "
          f"load {res['loadavg_before'][0]:.2f} -> {res['loadavg_after'][0]:.2f}")
    print(f"training step: min {step:.1f} ms, median {res['step']['median_ms']:.1f} ms | data fetch "
          f"{res['data_fetch']['min_ms']:.2f} ms -> data wait {res['data_wait_frac']:.3f} of a step")
    pl = res["pseudo_label"]
    three = pl["pl_3x3"]["min_ms"]
    print(f"{'':>40} | {'min ms':>7} | {'median ms':>9} | fraction of a step (min / min)")
    for name, t in pl.items():
        ratio = f" = {t['min_ms'] / three:.1f}x ours (3x3)" if name.startswith("released") else ""
        print(f"{name:>40} | {t['min_ms']:>7.3f} | {t['median_ms']:>9.3f} | {t['min_ms'] / step:.4f}{ratio}")
    bw = res["bandwidth"]
    print(f"bandwidth: {bw['state_bytes'] / 1e6:.2f} MB to read + write, copy {bw['bandwidth_GBps']:.1f} GB/s "
          f"-> limit {bw['limit_ms']:.3f} ms; the 3x3 call takes {three / bw['limit_ms']:.0f}x the limit")
    if "fused_phases_min_ms" in res:
        ph, eager = res["fused_phases_min_ms"], pl["pl_3x3_eager"]["min_ms"]
        print(f"3x3 call: fused ({res['fused_variant']} body) {three:.3f} ms = {three / bw['limit_ms']:.1f}x the "
              f"limit, eager {eager:.3f} ms "
              f"({eager / three:.1f}x the fused); in the kernel: scan (refinement, label, both confidences) "
              f"{ph['scan']:.3f} ms = {ph['scan'] / bw['limit_ms']:.1f}x the limit, DPA selection "
              f"{ph['dpa_selection']:.3f} ms, counting {ph['counting']:.3f} ms")
    for name, t in res.get("step_options", {}).items():
        extra = f", first step (compiling) {t['first_step_s']:.1f} s" if "first_step_s" in t else ""
        print(f"  step {name:>30}: min {t['min_ms']:.2f} ms (median {t['median_ms']:.2f}){extra}")


if __name__ == "__main__":
    main()
