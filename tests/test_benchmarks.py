"""Every benchmark in benchmarks/ runs, in a tiny configuration (tiny models from tests/tiny.py, a few seconds of
load), and writes the result file its docs read: a benchmark the tests never run rots unseen (issue 27)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_reviews, make_tiny_model, make_trained_student

from distilops.pipeline.quantize import Calibration, build
from distilops.pipeline.torch_model import open_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> dict[str, Path]:
    """What `make run` leaves for the benchmarks, tiny: prepared splits with their report, and a trained student."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    data.mkdir()
    reviews = make_reviews(n_movies=30, per_movie=6, seed=5)
    reviews = reviews[reviews["category"] != "plot"]
    reviews = reviews.assign(label=(reviews["category"] == "fresh").astype(int))
    reviews.iloc[:100].to_parquet(data / "train.parquet")
    reviews.iloc[100:130].to_parquet(data / "validation.parquet")
    reviews.iloc[100:].to_parquet(data / "test.parquet")
    long = [" ".join(reviews["text"].iloc[i: i + 6]) for i in range(0, 60, 6)]
    reviews.iloc[:10].assign(text=long, label=reviews["category"].iloc[:10]).to_parquet(data / "test_long.parquet")
    (data / "report.json").write_text(json.dumps({"labels": ["rotten", "fresh"]}))
    student = make_trained_student(root, max_length=16)
    calibration = Calibration.served_as(open_classifier(student), reviews["text"].iloc[:100].tolist())
    quantized = {variant: build(variant, student, root / "quantized", calibration=calibration)
                 for variant in ("onnx_fp32", "onnx_int8_static")}
    return {"data": data, "student": student, "root": root, **quantized}


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_int8_schemes(tiny_pipeline):
    out = tiny_pipeline["root"] / "int8_schemes.json"
    run_benchmark("int8_schemes.py", "--student", str(tiny_pipeline["student"]), "--teacher", "",
                  "--data", str(tiny_pipeline["data"]), "--general-texts", "0", "--calibration-texts", "50",
                  "--latency-samples", "5", "--repeats", "1", "--bootstrap", "100", "--window-overlap", "4",
                  "--max-windows", "4", "--out", str(out))
    result = json.loads(out.read_text())
    static, dynamic = result["summary"]["onnx_int8_static"], result["summary"]["onnx_int8"]
    assert static["test_labels_changed_batch1_vs_batch64"] == 0.0  # the property the scheme exists for
    for scheme in (static, dynamic):
        low, high = scheme["test_accuracy_ci"]
        assert low <= scheme["test_accuracy"] <= high and scheme["latency_p50_ms"] > 0 and scheme["size_mb"] > 0
    assert result["calibration"] == {"texts": 50, "method": "minmax", "from": "train split"}


def test_long_text_aggregation(tiny_pipeline):
    out = tiny_pipeline["root"] / "long.json"
    run_benchmark("long_text_aggregation.py", "--models", str(tiny_pipeline["student"]),
                  str(tiny_pipeline["onnx_int8_static"]), "--data", str(tiny_pipeline["data"]), "--out", str(out))
    models = json.loads(out.read_text())["models"]
    assert len(models) == 2
    for entry in models.values():
        assert entry["windows_per_text"] > 1  # the tiny long texts span several 16-token windows
        low, high = entry["mean_logits"]["accuracy_ci"]
        assert low <= entry["mean_logits"]["accuracy"] <= high


def test_padding_benchmark(tiny_pipeline):
    out = tiny_pipeline["root"] / "padding.json"
    run_benchmark("padding_benchmark.py", "--model", str(tiny_pipeline["student"]), "--data",
                  str(tiny_pipeline["data"]), "--batch-size", "8", "--max-length", "16", "--steps", "3",
                  "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["padded_tokens_grouped"] <= result["padded_tokens_random"] and result["real_tokens"] > 0


def test_gpu_pipeline_runs_on_the_cpu_too(tiny_pipeline):
    """Teacher fine-tuning, its logits, the half-depth student distilled: the GPU path, here on the CPU."""
    out = tiny_pipeline["root"] / "gpu_pipeline.json"
    teacher = make_tiny_model(tiny_pipeline["root"] / "teacher", layers=2)
    run_benchmark("gpu_pipeline.py", "--teacher", str(teacher), "--data", str(tiny_pipeline["data"]), "--epochs", "1",
                  "--batch-size", "16", "--max-length", "16", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and (result["teacher"]["layers"], result["student"]["layers"]) == (2, 1)
    assert 0 <= result["student"]["test_accuracy"] <= 1 and result["student_speedup_batch32"] > 0


@pytest.mark.slow
def test_ort_spinning(tiny_pipeline):
    out = tiny_pipeline["root"] / "spinning.json"
    data = tiny_pipeline["data"]
    run_benchmark("ort_spinning.py", "--onnx", str(tiny_pipeline["onnx_int8_static"]), "--data",
                  str(data / "test.parquet"), "--long-data", str(data / "test_long.parquet"), "--clients", "1,4",
                  "--long-clients", "4", "--seconds", "1", "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["summary"] and result["long_text_capacity_per_pod"]


@pytest.mark.slow
def test_serving_benchmark(tiny_pipeline):
    """Four servers (two BentoML, two Flask) under wrk, one second a run: every arm answers, none with errors."""
    out = tiny_pipeline["root"] / "serving.json"
    data = tiny_pipeline["data"]
    run_benchmark("serving_benchmark.py", "--student", str(tiny_pipeline["student"]),
                  "--onnx-fp32", str(tiny_pipeline["onnx_fp32"]), "--onnx", str(tiny_pipeline["onnx_int8_static"]),
                  "--data", str(data / "test.parquet"), "--long-data", str(data / "test_long.parquet"),
                  "--connections", "4", "--seconds", "1", "--warmup-seconds", "1", "--repeats", "1", "--out", str(out))
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"naive-pipeline-fp32", "bento-fp32", "naive-onnx-int8", "bento-onnx-int8",
                            "bento-onnx-int8+long"}
    assert all(arm["requests_per_second"] > 0 and arm["errors"] == 0 for arm in summary.values()), summary


@pytest.mark.slow
def test_lone_request(tiny_pipeline):
    out = tiny_pipeline["root"] / "lone.json"
    run_benchmark("lone_request.py", "--onnx", str(tiny_pipeline["onnx_int8_static"]),
                  "--data", str(tiny_pipeline["data"] / "test.parquet"), "--lone", "20", "--connections", "4",
                  "--seconds", "1", "--repeats", "1", "--out", str(out))
    summary = json.loads(out.read_text())["summary"]
    assert summary["model_batch1_p50_ms"] > 0
    for arm in ("adaptive", "no-lone-wait", "naive"):
        assert summary[arm]["lone_p50_ms"] > summary["model_batch1_p50_ms"] and summary[arm]["errors"] == 0


@pytest.mark.slow
def test_distributed_training(tmp_path):
    out = tmp_path / "distributed.json"
    run_benchmark("distributed_training.py", "--processes", "1", "2", "--rounds", "1", "--examples", "160",
                  "--layers", "1", "--hidden", "32", "--out", str(out))
    summary = json.loads(out.read_text())["summary"]
    assert summary["1"]["steps"] == summary["2"]["steps"] == 3  # 96 training examples, batch 32
    assert summary["2"]["max_abs_loss_diff_vs_1"] < 1e-5 and summary["2"]["wall_seconds_median"] > 0
