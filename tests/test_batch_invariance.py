"""A text's answer must not depend on what shares its batch: under adaptive batching the batch is other users'
traffic. Each text is scored alone, then inside random batches of random sizes and mixed lengths (long texts
read in several windows, so a batch holds windows of many widths and one text's windows travel together),
and its logits compared.

The served static int8 variant passes within TOLERANCE (in practice bit-identical: every activation has a
fixed scale, and each row of a batch is computed from its own values alone). ONNX Runtime's dynamic int8
fails the same check (its activation scales span the whole batch, padding included), which shows the check
can fail."""

import random

import numpy as np
import pytest
from tiny import make_calibration_texts, make_reviews, make_trained_student

from distilops.pipeline.quantize import Calibration, build
from distilops.pipeline.torch_model import open_classifier
from distilops.serving.inference import TextClassifier

# Logits may differ by float rounding (different padding widths change the vectorised kernels' loop shapes), not
# by a quantization step: one step of the dynamic variant moves logits by ~1e-3 of their spread, this is 1e-6.
TOLERANCE = 1e-5
MAX_LENGTH, MAX_WINDOWS = 16, 4  # windows of 16 tokens: a text joining 4 reviews spans 2-4 windows


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")
    student = make_trained_student(root, max_length=MAX_LENGTH)
    calibration = Calibration.served_as(open_classifier(student, max_windows=MAX_WINDOWS), make_calibration_texts())
    return {variant: build(variant, student, root / "quantized", calibration=calibration)
            for variant in ("onnx_int8_static", "onnx_int8")}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    reviews = make_reviews(n_movies=12, per_movie=4, seed=3)
    short = reviews[reviews["category"] != "plot"]["text"].tolist()
    long = [" ".join(short[i: i + 4]) for i in range(0, 24, 4)]
    return short + long


def batch_dependence(folder, texts: list[str], *, rounds: int = 25, seed: int = 0) -> tuple[float, int, list[int]]:
    """(largest logit difference, label flips, windows per text) between each text scored alone and the same text
    inside `rounds` random batches (sizes 2 to all texts, random composition and order), plus one batch of all."""
    model = TextClassifier(folder, device="cpu", max_windows=MAX_WINDOWS)
    alone = np.concatenate([model.predict_logits([text]) for text in texts])
    rng = random.Random(seed)
    batches = [rng.sample(range(len(texts)), rng.randint(2, len(texts))) for _ in range(rounds)]
    worst, flips = 0.0, 0
    for chosen in [*batches, list(range(len(texts)))]:
        logits = model.predict_logits([texts[i] for i in chosen])
        worst = max(worst, float(np.abs(logits - alone[chosen]).max()))
        flips += int((logits.argmax(-1) != alone[chosen].argmax(-1)).sum())
    return worst, flips, model.encode(texts).windows_per_text


def test_the_static_int8_variant_answers_a_text_the_same_in_any_batch(variants, texts):
    worst, flips, windows = batch_dependence(variants["onnx_int8_static"], texts)
    assert max(windows) >= 3 and min(windows) == 1  # long texts in several windows beside one-window texts
    assert flips == 0
    assert worst <= TOLERANCE, f"logits moved by {worst:.2e} with the batch"


def test_the_check_fails_on_dynamic_int8_whose_scales_span_the_batch(variants, texts):
    worst, _, _ = batch_dependence(variants["onnx_int8"], texts)
    assert worst > 100 * TOLERANCE, f"dynamic int8 moved by only {worst:.2e}: the check could not tell"
