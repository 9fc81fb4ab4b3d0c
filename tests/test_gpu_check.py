"""The prepared GPU check (scripts/gpu_check.sh, docs/performance.md) keeps working: its CPU tiny mode
runs here in seconds; on a CUDA host the CUDA pseudo-labels must equal the CPU ones bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # trains tiny runs (tests tiers: pyproject.toml)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_tiny_mode_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu_check_tiny.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny", str(out)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and all(res["fast_equals_general"].values())
    assert {(r["host"], r["crop"]) for r in res["rows"]} == {
        (h, c) for h in ("cutmix_seg", "fixmatch", "unimatch") for c in (32, 48)}
    for r in res["rows"]:
        assert r["img_per_s"] > 0 and r["flops_per_step"] > 0 and 0 < r["pseudo_label_frac"] < 1
        assert r["mfu"] is None  # no known peak for a CPU
    assert "img/s" in proc.stdout and "MFU" in proc.stdout


def test_peak_table_matches_device_names():
    from gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("Tesla T4") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pseudo_labels_equal_cpu():
    from s4mc.pseudo_label import PseudoLabeler

    g = torch.Generator().manual_seed(0)
    probs = torch.randn(4, 21, 65, 67, generator=g).mul(3).softmax(1)
    valid = torch.rand(4, 65, 67, generator=g) > 0.1
    gt = torch.randint(0, 21, (4, 65, 67), generator=g)
    for hood in ("3x3", "4", "5x5", "7x7"):
        labeler = PseudoLabeler(neighbourhood=hood)
        cpu = labeler(probs, valid, 0.3, gt=gt)
        dev = labeler(probs.cuda(), valid.cuda(), 0.3, gt=gt.cuda())
        assert torch.equal(cpu.label, dev.label.cpu()) and torch.equal(cpu.keep, dev.keep.cpu())
        for key, value in cpu.stats.items():
            torch.testing.assert_close(dev.stats[key].cpu(), value, rtol=0, atol=0, equal_nan=True)
