"""Evaluation metrics against hand-computed values; the speed protocol's shape (timings are benchmarks,
not asserted); the baseline ratios."""

import numpy as np
import pytest
from tiny import make_reviews, make_tiny_model

from distilops.pipeline.evaluate import classification_metrics, measure_speed, ratios_to_baseline
from distilops.pipeline.torch_model import open_classifier


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    preds = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    m = classification_metrics(labels, preds, ["rotten", "fresh"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    # rotten: precision 2/4, recall 2/3; fresh: precision 3/4, recall 3/5
    assert m["per_class"]["rotten"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["rotten"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["fresh"]["precision"] == pytest.approx(0.75)
    assert m["per_class"]["fresh"]["recall"] == pytest.approx(0.6)
    f1_rotten = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    f1_fresh = 2 * 0.75 * 0.6 / (0.75 + 0.6)
    assert m["macro_f1"] == pytest.approx((f1_rotten + f1_fresh) / 2)
    assert m["confusion_matrix"] == [[2, 1], [2, 3]]
    assert m["per_class"]["fresh"]["support"] == 5


def test_a_class_never_predicted_gets_zero_precision_not_an_error():
    m = classification_metrics(np.array([0, 1, 1]), np.array([1, 1, 1]), ["a", "b"])
    assert m["per_class"]["a"]["precision"] == 0.0 and m["accuracy"] == pytest.approx(2 / 3)


def test_measure_speed_reports_every_model(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    texts = make_reviews(n_movies=5, per_movie=4)["text"].tolist()
    models = {"a": open_classifier(folder), "b": open_classifier(folder)}
    speed = measure_speed(models, texts, batch_size=8, latency_samples=5, repeats=2, progress=False)
    assert set(speed) == {"a", "b"}
    for entry in speed.values():
        assert entry["throughput_batch8"] > 0
        assert 0 < entry["latency_p50_ms"] <= entry["latency_p95_ms"]


def test_ratios_to_the_teacher():
    teacher = {"accuracy": 0.9, "throughput_batch32": 100.0, "latency_p50_ms": 8.0, "latency_p95_ms": 10.0,
               "size_mb": 100.0, "parameters": 1000}
    student = {"accuracy": 0.873, "throughput_batch32": 250.0, "latency_p50_ms": 2.0, "latency_p95_ms": 4.0,
               "size_mb": 25.0, "parameters": 500}
    r = ratios_to_baseline(student, teacher)
    assert r["accuracy_retention"] == pytest.approx(0.97)
    assert r["accuracy_points"] == pytest.approx(-2.7)
    assert r["throughput_speedup"] == pytest.approx(2.5)
    assert r["latency_p50_speedup"] == pytest.approx(4.0) and r["latency_p95_speedup"] == pytest.approx(2.5)
    assert r["size_fraction"] == pytest.approx(0.25) and r["parameter_fraction"] == pytest.approx(0.5)


def test_paired_quality_gives_intervals_retention_and_mcnemar():
    from distilops.pipeline.evaluate import paired_quality

    labels = np.array([0, 1] * 50)
    teacher = labels.copy()
    teacher[:10] = 1 - teacher[:10]  # 90% right
    student = teacher.copy()
    student[10:16] = 1 - student[10:16]  # 6 more wrong: 84%
    out = paired_quality(labels, {"teacher": teacher, "student": student}, ["rotten", "fresh"],
                         resamples=500, seed=0)
    assert out["teacher"]["accuracy"] == 0.9 and "retention" not in out["teacher"]
    s = out["student"]
    assert s["accuracy"] == pytest.approx(0.84) and s["agreement_with_teacher"] == pytest.approx(0.94)
    assert s["accuracy_ci"][0] < 0.84 < s["accuracy_ci"][1]
    assert s["retention"] == pytest.approx(0.84 / 0.9) and s["retention_ci"][0] < s["retention"] < s["retention_ci"][1]
    assert s["mcnemar_vs_teacher"] == {"model_only_right": 0, "teacher_only_right": 6, "p_value": pytest.approx(2 / 64)}
