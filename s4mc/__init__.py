"""S4MC: semi-supervised semantic segmentation via marginal contextual information (Kimhi et al.,
TMLR 2024), as a plain PyTorch library.

The public API is small: `refine` and `confidence` are the method's core; `PseudoLabeler` combines
them with Dynamic Partition Adjustment into pseudo-labels and their quantity/quality statistics;
`build_model` gives DeepLabV3+; `load_config` and `run_training` train a run. Heavier pieces load
lazily, so `import s4mc` stays fast.
"""

from s4mc.confidence import CONFIDENCE_KINDS, confidence
from s4mc.pseudo_label import PseudoLabeler, PseudoLabels
from s4mc.refine import estimate_cooccurrence, refine
from s4mc.threshold import alpha_schedule, dpa_threshold

__version__ = "0.1.0"

__all__ = [
    "CONFIDENCE_KINDS", "PseudoLabeler", "PseudoLabels", "alpha_schedule", "build_model", "confidence",
    "dpa_threshold", "estimate_cooccurrence", "load_config", "refine", "run_training", "__version__",
]


def __getattr__(name: str):
    # Lazy: the model zoo and the trainer pull in more modules than the method core needs.
    if name == "build_model":
        from s4mc.models import build_model
        return build_model
    if name == "load_config":
        from s4mc.config import load_config
        return load_config
    if name == "run_training":
        from s4mc.train import run_training
        return run_training
    raise AttributeError(f"module 's4mc' has no attribute {name!r}")
