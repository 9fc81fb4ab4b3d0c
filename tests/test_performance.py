"""The training-step switches of docs/performance.md: optimizer kernels, channels_last, compile, and the
data-wait / first-step timings of summary.json."""

import copy

import pytest
import torch

from s4mc.config import ConfigError, load_config
from s4mc.models import build_model
from s4mc.train import run_training
from s4mc.train.build import optimizer_kernels, prepare_networks

TINY = ["data.embedded.image_size=32", "data.embedded.num_train=48", "data.embedded.num_val=6",
        "data.crop_size=32", "data.split=20", "data.batch_size=2", "data.unlabeled_batch_size=2",
        "model.width=0.25", "model.head_channels=32", "train.steps=2", "train.eval_every=2",
        "train.log_every=1", "train.threads=1", "train.progress=false", "eval.batch_size=6"]


def test_optimizer_kernels():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert optimizer_kernels("auto", cpu) == {"foreach": True}
    assert optimizer_kernels("auto", cuda) == {"fused": True}
    assert optimizer_kernels("for_loop", cuda) == {"foreach": False}
    assert optimizer_kernels("fused", cpu) == {"fused": True}
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        load_config(overrides=["train.optimizer_impl=turbo"])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_foreach_gives_the_per_parameter_loops_bits_on_cpu(optimizer):
    # Why auto may pick foreach on CPU without changing any published number (docs/performance.md).
    torch.manual_seed(0)
    model = build_model(backbone="resnet18", num_classes=3, width=0.125, head_channels=16)
    results = []
    for impl in ("for_loop", "foreach"):
        m = copy.deepcopy(model)
        groups = m.param_groups(0.01, 10.0, 1e-4)
        kw = optimizer_kernels(impl, torch.device("cpu"))
        opt = (torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4, **kw) if optimizer == "sgd"
               else torch.optim.AdamW(groups, lr=0.01, weight_decay=1e-4, **kw))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_channels_last_only_on_cuda_and_compile_in_place():
    cfg = load_config(overrides=["train.compile=true"])
    model = build_model(backbone="resnet18", num_classes=3, width=0.125, head_channels=16)
    keys = list(model.state_dict())
    student, teacher = prepare_networks(model, True, cfg, torch.device("cpu"))
    conv = student.state_dict()[next(k for k in keys if k.endswith("weight") and "conv" in k)]
    assert conv.is_contiguous()  # channels_last is for CUDA only
    assert list(student.state_dict()) == keys and list(teacher.state_dict()) == keys  # no _orig_mod.
    assert not any(p.requires_grad for p in teacher.parameters())


def test_summary_reports_data_wait_and_first_step(tmp_path):
    summary = run_training(load_config(overrides=TINY + [f"run.dir={tmp_path}"]))
    assert 0.0 < summary["data_wait_frac"] < 1.0
    assert 0.0 < summary["first_step_s"] <= summary["train_time_s"]
