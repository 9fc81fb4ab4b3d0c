"""Checkpoints that hold everything an exact resume needs, written atomically.

A checkpoint stores the student, the EMA teacher, the optimizer, the step, every RNG state (python,
numpy, torch CPU and CUDA), the data-stream position (the step: batches are a pure function of
(seed, step)), the eval history and the config. docs/method.md §9 lists checkpoints without these as a
defect of the released code. Files are written to a temporary name and renamed, so a crash during a
save never leaves a truncated `last.pt`.

Checkpoints come back from shared storage or S3 on resume, so whoever can write there could plant a
pickle that runs code on load. `load_checkpoint` therefore uses torch's restricted unpickler
(`weights_only=True`) and allow-lists only the numpy types our own files hold (the numpy RNG state is
an ndarray; eval history may hold numpy scalars), none of which can call arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], is_best: bool, keep: int) -> Path:
    """Writes step_<t>.pt, refreshes last.pt (and best.pt), prunes old step files."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"step_{step:08d}.pt"
    save_atomic({**state, "rng": rng_state()}, path)
    for alias in ["last.pt"] + (["best.pt"] if is_best else []):
        tmp = ckpt_dir / (alias + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # a hard link: no second copy of the weights on disk
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, ckpt_dir / alias)
    steps = sorted(ckpt_dir.glob("step_*.pt"))
    for old in steps[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _safe_globals() -> list[Any]:
    """What `torch.serialization.get_unsafe_globals_in_checkpoint` lists for our checkpoints: ndarray
    reconstruction (numpy RNG state), numpy scalars (metrics in the eval history) and their dtypes."""
    from numpy._core.multiarray import _reconstruct, scalar

    dtypes = [getattr(np.dtypes, name) for name in ("UInt32DType", "Int64DType", "Int32DType", "Float64DType",
                                                     "Float32DType", "BoolDType")]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint with the restricted unpickler; anything outside tensors, plain python
    containers and the allow-listed numpy types is refused with a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # torch's message for a refused global is a paragraph recommending weights_only=False, which is
        # exactly the unsafe path; keep only the line that names what was refused.
        refused = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln]
        if isinstance(exc, pickle.UnpicklingError) and refused:
            raise ValueError(f"checkpoint {path} refused: {refused[0].rstrip('.')}; it holds objects outside "
                             "the allow-list, so it was not written by s4mc or was tampered with") from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first}); "
                         "delete it to start over or point to another checkpoint") from None
