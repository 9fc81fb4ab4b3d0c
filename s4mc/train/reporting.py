"""What a run leaves for people: versions, sample predictions and the closing summary table."""

from __future__ import annotations

import json
import math
import platform
import socket
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from s4mc.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_versions(path: Path, device: torch.device, pretrained: str | None = None) -> None:
    import omegaconf

    import s4mc

    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "omegaconf": omegaconf.__version__, "s4mc": getattr(s4mc, "__version__", "unknown"),
            "git_commit": git_commit(), "host": socket.gethostname(), "device": str(device),
            "cuda": torch.version.cuda, "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if pretrained:
        # The encoder file a run started from, with its sha256: weights are part of what a run used.
        from s4mc.pretrain import sha256_file

        info["pretrained"] = {"path": str(pretrained), "sha256": sha256_file(Path(pretrained))}
    path.write_text(json.dumps(info, indent=2))


def palette(n: int = 256) -> np.ndarray:
    """The VOC colour map (bit-interleaved), used by every segmentation code base to draw masks."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[255] = (255, 255, 255)
    return pal


def _denormalize(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.cpu().float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def save_samples(path: Path, run, n: int = 4) -> None:
    """A strip per val image: image | ground truth | prediction of the evaluated network (eval.model)."""
    model = run.eval_network
    was_training = model.training
    model.eval()
    pal = palette()
    rows = []
    for i in range(min(n, len(run.data.val))):
        item = run.data.val[i]
        logits = model(item["image"].unsqueeze(0).to(run.device))
        pred = logits.argmax(1)[0].cpu().numpy()
        rows.append(np.concatenate([_denormalize(item["image"]), pal[item["mask"].numpy()], pal[pred]], axis=1))
    model.train(was_training)
    if not rows:
        return
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"


def print_summary(summary: dict, class_names: list[str]) -> None:
    final = summary.get("final", {})
    lines = [f"Run finished: {summary['run_dir']}",
             f"  steps {summary['steps']}/{summary['total_steps']}   train time {summary['train_time_s']:.1f} s"
             f"   {summary['steps_per_s']:.2f} steps/s   best eval/mIoU {_fmt(summary['best/eval/mIoU'])}"
             f" at step {summary['best/step']}"]
    keys = ["eval/mIoU", "eval/pixel_acc", "pl/quantity", "pl/quantity_no_refine", "pl/quality",
            "pl/quality_no_refine"]
    width = max(len(k) for k in keys)
    lines.append(f"  {'metric (final eval)':<{width}}  value")
    lines += [f"  {k:<{width}}  {_fmt(final.get(k))}" for k in keys if k in final]
    per_class = [(c, final.get(f"eval/IoU/{c}")) for c in class_names]
    lines.append("  per-class IoU: " + "  ".join(f"{c}={_fmt(v)}" for c, v in per_class if v is not None))
    print("\n".join(lines), flush=True)
