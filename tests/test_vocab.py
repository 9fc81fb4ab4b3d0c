"""The method's vocabulary (s4mc/vocab.py) is the one the schema validates and the core implements."""

from __future__ import annotations

import importlib

import pytest
import torch

from s4mc import vocab
from s4mc.confidence import confidence
from s4mc.config import CHOICES, RANGES, EvalConfig
from s4mc.evaluation import predict
from s4mc.refine import neighbour_offsets, refine


def test_vocab_is_torch_free():
    source = importlib.util.find_spec("s4mc.vocab").origin
    text = open(source).read()
    assert "import torch" not in text and "import numpy" not in text


def test_schema_choices_are_the_vocabulary():
    assert CHOICES["s4mc.neighbourhood"] == vocab.NEIGHBOURHOODS
    assert CHOICES["s4mc.confidence"] == CHOICES["host.threshold_confidence"] == vocab.CONFIDENCE_KINDS
    assert CHOICES["s4mc.beta"] == vocab.BETAS and CHOICES["s4mc.joint"] == vocab.JOINTS
    assert CHOICES["s4mc.selection"] == vocab.SELECTIONS and CHOICES["s4mc.cooccurrence_void"] == vocab.VOID_RULES
    assert CHOICES["eval.mode"] == vocab.EVAL_MODES
    assert RANGES["s4mc.k"][1] == vocab.MAX_K
    assert EvalConfig().stride_ratio == vocab.SLIDING_STRIDE_RATIO


@pytest.mark.parametrize("name", vocab.NEIGHBOURHOODS)
def test_each_neighbourhood_is_implemented_with_its_neighbour_count(name):
    assert len(neighbour_offsets(name)) == vocab.NEIGHBOUR_COUNT[name]
    probs = torch.softmax(torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0)), 1)
    k = vocab.NEIGHBOUR_COUNT[name]
    assert refine(probs, neighbourhood=name, k=k).shape == probs.shape
    with pytest.raises(ValueError, match="k="):
        refine(probs, neighbourhood=name, k=k + 1)


def test_an_unknown_option_is_refused_by_the_core():
    probs = torch.full((1, 2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="neighbourhood"):
        refine(probs, neighbourhood="9x9")
    with pytest.raises(ValueError, match="kind"):
        confidence(probs, "variance")


@pytest.mark.parametrize("kind", vocab.CONFIDENCE_KINDS)
def test_each_confidence_kind_is_implemented(kind):
    probs = torch.softmax(torch.randn(2, 3, 4, 4), 1)
    assert confidence(probs, kind).shape == (2, 4, 4)


@pytest.mark.parametrize("mode", vocab.EVAL_MODES)
def test_each_eval_mode_is_implemented(mode):
    model = torch.nn.Conv2d(3, 2, 1)
    out = predict(model, torch.randn(1, 3, 8, 8), mode=mode, crop_size=6)
    assert out.shape[-2:] == ((6, 6) if mode == "center_crop" else (8, 8))


def test_one_ignore_index_everywhere():
    from s4mc import evaluation
    from s4mc.data import errors, transforms
    from s4mc.frameworks import base

    assert {errors.IGNORE_INDEX, transforms.IGNORE_INDEX, base.IGNORE_INDEX, evaluation.IGNORE_INDEX} == {255}
    assert all(m.IGNORE_INDEX is vocab.IGNORE_INDEX for m in (errors, transforms, base, evaluation))
