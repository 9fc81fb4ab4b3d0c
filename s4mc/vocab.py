"""The method's vocabulary: the names and limits that the config schema and the core both use.

One torch-free module, so that s4mc/config.py validates a config against exactly the options that
s4mc/refine.py, confidence.py, evaluation.py and the data code implement (tests/test_vocab.py ties
each tuple to its implementation). The first entry of each option tuple is the paper's default
(docs/method.md: neighbourhood §3 and paper Table 7, confidence §2 and paper Table F.1).
"""

from __future__ import annotations

IGNORE_INDEX = 255  # label value of void / unlabelled pixels in every mask (docs/architecture.md)

# Marginal-contextual refinement (docs/method.md §3).
NEIGHBOURHOODS = ("3x3", "4", "5x5", "7x7")
NEIGHBOUR_COUNT = {"4": 4, "3x3": 8, "5x5": 24, "7x7": 48}  # neighbours of a pixel, itself excluded
MAX_K = max(NEIGHBOUR_COUNT.values())  # k neighbours joined per class: at most all of the largest one
BETAS = ("one", "decay")
JOINTS = ("independent", "expected")
SELECTIONS = ("max", "min", "random")
VOID_RULES = ("different", "exclude")  # how a void neighbour counts in the co-occurrence (docs/hosts.md)

CONFIDENCE_KINDS = ("max", "entropy", "margin")  # kappa (docs/method.md §2)
# How the CPU runs the paper-default pseudo-labelling call (docs/performance.md, "The fused CPU kernel"):
# the fused C kernel where a compiler builds it, warning once where none does; always; or never.
CPU_KERNELS = ("auto", "fused", "eager")

# Evaluation (docs/method.md §7): whole image, centre crop, or sliding windows whose stride is 2/3 of
# the window (the Cityscapes protocol).
EVAL_MODES = ("full", "center_crop", "sliding")
SLIDING_STRIDE_RATIO = 2 / 3
