"""Training: the loop, checkpoints with exact resume, callbacks and the run folder."""

from s4mc.train.callbacks import Callback, StopTraining
from s4mc.train.loop import run_training

__all__ = ["Callback", "StopTraining", "run_training"]
