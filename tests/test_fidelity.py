"""Quantized exports stay close to fp32: top-1 agreement and logit cosine over 256 teacher-forced positions."""

from __future__ import annotations

import pytest

from conftest import noise_image
from molmocap.export.fidelity import fidelity
from molmocap.runtime import Captioner

# Thresholds for a tiny random model, whose flat logits make top-1 fragile; a broken scale or layout gives a
# cosine near 0 and chance-level agreement.
THRESHOLDS = {"fp32": (1.0, 0.99999), "int8": (0.9, 0.999), "int4": (0.7, 0.95), "mixed": (0.8, 0.97),
              "fp16": (0.99, 0.9999), "int4-fp16": (0.7, 0.95)}


@pytest.fixture(scope="module")
def reference(quantized):
    return Captioner.load(quantized["fp32"], threads=1)


@pytest.mark.parametrize("quant", list(THRESHOLDS))
def test_teacher_forced_agreement(quant, quantized, reference):
    result = fidelity(reference, Captioner.load(quantized[quant], threads=1), noise_image(300, 400, seed=4),
                      "Describe this image.", positions=256, max_crops=2)
    top1, cosine = THRESHOLDS[quant]
    assert result["positions"] == 256
    assert result["top1_agreement"] >= top1, result
    assert result["cosine_mean"] >= cosine, result
