"""s4mc/train/checkpoint.py loads with torch's restricted unpickler: our own checkpoints (numpy RNG
state, numpy scalars in the history) load; a pickle that would run code is refused in one line."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from s4mc.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_own_checkpoint_round_trips(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"step": 2, "student": model.state_dict(), "optimizer": opt.state_dict(), "best_miou": -math.inf,
             "history": [{"step": 2, "eval/mIoU": np.float64(12.5), "n": np.int64(3)}], "config": "a: 1\n"}
    path = save_checkpoint(tmp_path, 2, state, is_best=True, keep=2)
    expected = np.random.rand()  # the draw that follows the saved numpy state
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 2 and loaded["history"][0]["eval/mIoU"] == 12.5
    torch.testing.assert_close(loaded["student"]["weight"], model.state_dict()["weight"])
    set_rng_state(loaded["rng"])
    assert np.random.rand() == expected
    assert path.name == "step_00000002.pt" and set(rng_state()) >= {"python", "numpy", "torch"}


def test_malicious_pickle_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "last.pt"
    torch.save({"step": 1, "payload": _RunsCode(str(marker))}, bad)
    with pytest.raises(ValueError) as err:
        load_checkpoint(bad)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "posix.system" in message
    assert not marker.exists(), "loading the checkpoint executed code"


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint .*last\.pt cannot be read"):
        load_checkpoint(bad)
