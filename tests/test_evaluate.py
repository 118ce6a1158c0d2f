"""Evaluation metrics against hand-computed values; the speed protocol's shape (timings are benchmarks,
not asserted); the baseline ratios; agreement intervals and the serving reference (serving/fidelity.py);
label-free agreement with the teacher on unlabelled sets."""

import numpy as np
import pandas as pd
import pytest
from conftest import load_stage
from tiny import make_reviews, make_tiny_model

from distilops import stats
from distilops.config import EvaluateConfig, UnlabeledSet
from distilops.errors import DataError
from distilops.pipeline.evaluate import (
    class_breakdown,
    flat_metrics,
    measure_speed,
    model_folders,
    ratios_to_baseline,
    reference_of,
    run,
    unlabeled_summary_line,
    windows_per_text,
)
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.quantize import build
from distilops.pipeline.torch_model import open_classifier
from distilops.serving import fidelity


def test_classification_metrics_by_hand():
    from distilops.pipeline.evaluate import paired_quality

    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    preds = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    m = {**class_breakdown(labels, preds, ["rotten", "fresh"]),
         **paired_quality(labels, {"teacher": preds}, ["rotten", "fresh"], resamples=10, seed=0)["teacher"]}
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
    m = class_breakdown(np.array([0, 1, 1]), np.array([1, 1, 1]), ["a", "b"])
    assert m["per_class"]["a"]["precision"] == 0.0 and m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)


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
    # agreement: 94 of 100 texts given the teacher's label, resampled on the same texts as the accuracies
    low, high = s["agreement_with_teacher_ci"]
    assert low < 0.94 < high and (low, high) == stats.accuracy_interval(student == teacher,
                                                                        stats.bootstrap_indices(100, 500, 0))
    assert out["teacher"]["agreement_with_teacher_ci"] == [1.0, 1.0]


@pytest.fixture(scope="module")
def onnx_student(tmp_path_factory):
    """A tiny ONNX student with 16-token windows: a 60-word text needs more than one."""
    root = tmp_path_factory.mktemp("reference")
    raw = make_tiny_model(root / "raw")
    student = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), root / "student", max_length=16,
                                role="student", teacher="tiny-teacher")
    return student, build("onnx_fp32", student, root / "quantized")


LONG = " ".join(["great"] * 60)  # 60 tokens: 16-token windows sharing 4 read it in 6, capped at 3
TEXTS = ["great film", "dull and bland", "a wonderful moving film", LONG]


def test_the_reference_describes_the_answers_by_hand(onnx_student):
    _, folder = onnx_student
    model = open_classifier(folder, window_overlap=4, max_windows=3)
    assert windows_per_text(model, TEXTS) == windows_per_text(model, TEXTS, batch_size=1) == [1, 1, 1, 3]
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0], [1.0, 0.0]])  # what the service would score:
    # rotten 0.881, fresh 0.953, rotten 0.5 (a tie goes to the first label, as argmax), rotten 0.731
    quality = {"agreement_with_teacher": 0.75, "agreement_with_teacher_ci": [0.5, 1.0]}
    ref = reference_of(model, logits, TEXTS, quality)
    assert (ref["split"], ref["texts"]) == ("test", 4)
    assert ref["agreement_with_teacher"] == 0.75 and ref["agreement_with_teacher_ci"] == [0.5, 1.0]
    assert ref["label"] == {"labels": ["rotten", "fresh"], "fractions": [0.75, 0.25]}
    # confidence bins: <=0.6 | 0.7 | 0.8 | 0.9 | 0.95 | 0.99 | above
    assert ref["confidence"] == {"edges": list(fidelity.CONFIDENCE_EDGES),
                                 "fractions": [0.25, 0.0, 0.25, 0.25, 0.0, 0.25, 0.0]}
    assert ref["words"]["fractions"] == [0.75, 0.0, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0]  # 2, 3, 4 words; 60
    assert ref["windows"]["fractions"] == [0.75, 0.0, 0.25, 0.0, 0.0, 0.0]  # 1, 1, 1; 3 windows


def test_run_gives_every_onnx_student_a_reference_from_its_own_answers(onnx_student, tmp_path):
    student, onnx = onnx_student
    teacher = save_model_folder(load_classifier(str(make_tiny_model(tmp_path / "t", seed=1))),
                                load_tokenizer(str(tmp_path / "t")), tmp_path / "teacher", max_length=16)
    frame = make_reviews(n_movies=6, per_movie=4)
    test = frame[frame["category"] != "plot"].assign(label=lambda f: (f["category"] == "fresh").astype(int))
    test = pd.concat([test, pd.DataFrame({"text": [LONG], "label": [1]})], ignore_index=True)
    cfg = EvaluateConfig(speed_texts=8, latency_samples=2, repeats=1, bootstrap_resamples=100, threads=1,
                         window_overlap=4, max_windows=3)
    evaluation = run(cfg, {"teacher": teacher, "student": student, "student_onnx_fp32": onnx}, test, {},
                     ["rotten", "fresh"])
    models = evaluation.report["models"]
    assert "reference" not in models["teacher"] and "reference" not in models["student"]  # PyTorch: never served
    ref, entry = models["student_onnx_fp32"]["reference"], models["student_onnx_fp32"]
    assert ref["texts"] == len(test) and ref["agreement_with_teacher_ci"] == entry["agreement_with_teacher_ci"]
    assert ref["agreement_with_teacher"] == entry["agreement_with_teacher"]
    predicted = evaluation.predictions["student_onnx_fp32"]
    assert ref["label"]["fractions"] == pytest.approx([(predicted == 0).mean(), (predicted == 1).mean()])
    assert ref["windows"]["fractions"][2] == pytest.approx(1 / len(test))  # the long text: 3 windows
    scores = [c.score for c in open_classifier(onnx, window_overlap=4, max_windows=3).classify(test["text"].tolist())]
    assert ref["confidence"]["fractions"] == pytest.approx(fidelity.fractions(scores, fidelity.CONFIDENCE_EDGES))
    for name in models:
        low, high = models[name]["agreement_with_teacher_ci"]
        assert 0 <= low <= models[name]["agreement_with_teacher"] <= high <= 1


def test_the_teacher_export_is_no_student_variant():
    folders = model_folders({"onnx_int8": {}, "onnx_fp16": {}, "teacher_onnx": {}})
    assert list(folders) == ["teacher", "student", "student_onnx_int8", "student_onnx_fp16"]


def test_agreement_with_the_teacher_on_an_unlabelled_file_needs_no_labels(onnx_student, tmp_path):
    """A file of logged requests: each model's agreement with the teacher, with paired draws; the teacher is 1.0."""
    student, onnx = onnx_student
    teacher = save_model_folder(load_classifier(str(make_tiny_model(tmp_path / "t", seed=1))),
                                load_tokenizer(str(tmp_path / "t")), tmp_path / "teacher", max_length=16)
    requests = make_reviews(n_movies=8, per_movie=5)["text"].tolist()
    (tmp_path / "requests.txt").write_text("\n".join(requests) + "\n")
    stage = load_stage("evaluate")
    found = stage.load_unlabeled(UnlabeledSet(name="requests", source=str(tmp_path / "requests.txt")), seed=0)
    assert (found.source, found.texts) == (str(tmp_path / "requests.txt"), requests)
    frame = make_reviews(n_movies=4, per_movie=4)
    test = frame[frame["category"] != "plot"].assign(label=lambda f: (f["category"] == "fresh").astype(int))
    cfg = EvaluateConfig(speed_texts=8, latency_samples=2, repeats=1, bootstrap_resamples=100, threads=1,
                         window_overlap=4, max_windows=3)
    folders = {"teacher": teacher, "student": student, "student_onnx_fp32": onnx}
    report = run(cfg, folders, test, {}, ["rotten", "fresh"], {"requests": found}).report
    entry = report["unlabeled_sets"]["requests"]
    assert (entry["texts"], entry["source"]) == (len(requests), found.source)
    assert entry["models"]["teacher"] == {"agreement_with_teacher": 1.0, "agreement_with_teacher_ci": [1.0, 1.0]}
    def answers(folder):  # read as evaluate reads them: 16-token windows sharing 4, at most 3
        return open_classifier(folder, window_overlap=4, max_windows=3).predict_logits_batched(requests).argmax(-1)

    teacher_says = answers(teacher)
    indices = stats.bootstrap_indices(len(requests), 100, cfg.seed + 1)  # the first set after no extra sets
    for name in ("student", "student_onnx_fp32"):
        agrees = answers(folders[name]) == teacher_says
        m = entry["models"][name]
        assert m["agreement_with_teacher"] == pytest.approx(agrees.mean())
        assert m["agreement_with_teacher_ci"] == pytest.approx(list(stats.accuracy_interval(agrees, indices)))
    flat = flat_metrics(report)
    assert flat["requests.student.agreement_with_teacher"] == entry["models"]["student"]["agreement_with_teacher"]
    assert (flat["requests.teacher.agreement_with_teacher_low"], flat["requests.teacher.agreement_with_teacher_high"]
            ) == (1.0, 1.0)
    line = unlabeled_summary_line("requests", entry)
    assert line.startswith(f"requests: {len(requests)} unlabelled texts (") and "student_onnx_fp32 " in line


def test_an_unlabelled_set_that_is_missing_or_empty_names_its_params_key(tmp_path):
    stage = load_stage("evaluate")
    with pytest.raises(DataError, match=r"evaluate.unlabeled_sets 'logs': text source 'nope.txt' is neither a file"):
        stage.load_unlabeled(UnlabeledSet(name="logs", source="nope.txt"), seed=0)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"evaluate.unlabeled_sets 'logs': '.*empty.txt' holds no texts"):
        stage.load_unlabeled(UnlabeledSet(name="logs", source=str(tmp_path / "empty.txt")), seed=0)


def test_the_evaluation_plots_draw_each_models_numbers(tmp_path):
    """What each PNG shows: every model's confusion matrix cell by cell, its accuracy against its latency with its
    name and size, and every set's accuracy with its interval per model."""
    from matplotlib.collections import PathCollection

    from distilops.pipeline.evaluate import plot_accuracy_vs_latency, plot_confusion_matrices, plot_set_accuracies

    results = {"teacher": {"confusion_matrix": [[40, 10], [5, 45]], "accuracy": 0.85, "latency_p50_ms": 8.0,
                           "size_mb": 90.0},
               "student_onnx_int8": {"confusion_matrix": [[38, 12], [7, 43]], "accuracy": 0.81, "latency_p50_ms": 2.0,
                                     "size_mb": 23.0}}
    confusion = plot_confusion_matrices(results, ["rotten", "fresh"], tmp_path / "confusion.png")
    for ax, (name, entry) in zip(confusion.axes, results.items(), strict=True):
        assert [int(t.get_text()) for t in ax.texts] == [v for row in entry["confusion_matrix"] for v in row]
        assert ax.get_title() == f"{name}\nacc {entry['accuracy']:.3f}"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["rotten", "fresh"]

    tradeoff = plot_accuracy_vs_latency(results, tmp_path / "tradeoff.png").axes[0]
    dots = [c.get_offsets().tolist()[0] for c in tradeoff.collections if isinstance(c, PathCollection)]
    assert dots == [[2.0, 0.81], [8.0, 0.85]]  # fastest first
    assert [t.get_text() for t in tradeoff.texts] == ["student_onnx_int8\n23 MB, 2.00 ms", "teacher\n90 MB, 8.00 ms"]

    rows = [{"set": s, "model": m, "accuracy": a, "accuracy_low": a - 0.02, "accuracy_high": a + 0.03}
            for s, m, a in [("test", "teacher", 0.85), ("test", "student", 0.81), ("long", "teacher", 0.8),
                            ("long", "student", 0.7)]]
    sets = plot_set_accuracies(rows, tmp_path / "sets.png").axes[0]
    bars = {c.get_label(): c for c in sets.containers}
    assert set(bars) == {"teacher", "student"}
    student_points = bars["student"].lines[0].get_ydata().tolist()
    assert student_points == [0.81, 0.7]
    assert [t.get_text() for t in sets.get_xticklabels()] == ["test", "long"]
    for png in ("confusion.png", "tradeoff.png", "sets.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
