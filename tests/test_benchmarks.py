"""Every benchmark in benchmarks/ runs, in a tiny configuration (tiny models from tests/tiny.py, a few seconds of
load), and writes the result file its docs read: a benchmark the tests never run rots unseen (issue 27)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import RepoCopy
from test_pipeline_train import TINY
from test_pipeline_train import tiny_pipeline as tiny_repo
from tiny import make_reviews, make_tiny_model, make_trained_student, make_wheel

from distilops.pipeline.quantize import TEACHER_VARIANT, Calibration, build, export_teacher
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


def run_benchmark(script: str, *args: str, timeout: float = 300, env: dict | None = None,
                  cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, env=env)
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
def test_bento_vs_naive(tiny_pipeline):
    """BentoML (this checkout, and again as an --arm with a setting) against the naive server, two client counts and
    the long mix, one second a run: every cell has every arm, no errors, ratios against the naive server."""
    out = tiny_pipeline["root"] / "bento_vs_naive.json"
    data = tiny_pipeline["data"]
    run_benchmark("bento_vs_naive.py", "--onnx", str(tiny_pipeline["onnx_int8_static"]), "--data",
                  str(data / "test.parquet"), "--long-data", str(data / "test_long.parquet"), "--clients", "1,4",
                  "--seconds", "1", "--warmup-seconds", "1", "--repeats", "1",
                  "--arm", "unsplit:DISTILOPS_TEXTS_PER_CALL=0", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"short", "long10%"}
    for mix in result["summary"].values():
        assert set(mix) == {"1", "4"}
        for cell in mix.values():
            assert set(cell) == {"naive", "bento", "unsplit"}
            assert all(arm["ok_per_second"] > 0 and arm["errors"] == 0 and arm["cpu_ms_per_request"] > 0
                       for arm in cell.values()), cell
    assert set(result["ratios"]["short"]["4"]) == {"bento / naive", "unsplit / naive"}
    summarized = result["summary"]
    run_benchmark("bento_vs_naive.py", "--summarize-again", "--out", str(out))  # from the stored runs alone
    assert json.loads(out.read_text())["summary"] == summarized


@pytest.mark.slow
def test_bento_vs_naive_refuses_a_bad_arm():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/bento_vs_naive.py"), "--arm", "naive:X=1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "expected NAME:KEY=VALUE" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_profile_worker(tiny_pipeline):
    """py-spy over a BentoML worker under two seconds of load: the event loop and the model thread are profiled,
    each sample in a part, and the worker's CPU per thread is read."""
    out = tiny_pipeline["root"] / "profile.json"
    run_benchmark("profile_worker.py", "--onnx", str(tiny_pipeline["onnx_int8_static"]), "--data",
                  str(tiny_pipeline["data"] / "test.parquet"), "--clients", "4", "--seconds", "2",
                  "--warmup-seconds", "1", "--out", str(out),
                  env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    result = json.loads(out.read_text())
    threads = result["python_threads"]
    main = next(t for name, t in threads.items() if name.startswith("MainThread"))
    assert sum(main["fractions"].values()) == pytest.approx(1, abs=1e-3)
    assert any("model: ONNX Runtime run" in t["fractions"] for t in threads.values())
    assert result["under_profile"]["requests_per_second"] > 0 and result["cores_busy_worker_total"] > 0


@pytest.mark.slow
def test_lone_request(tiny_pipeline):
    out = tiny_pipeline["root"] / "lone.json"
    run_benchmark("lone_request.py", "--onnx", str(tiny_pipeline["onnx_int8_static"]),
                  "--data", str(tiny_pipeline["data"] / "test.parquet"), "--lone", "20", "--connections", "4",
                  "--seconds", "1", "--repeats", "1", "--out", str(out))
    summary = json.loads(out.read_text())["summary"]
    assert summary["model_batch1_p50_ms"] > 0
    for arm in ("adaptive", "no-lone-wait", "continuous", "naive"):
        assert summary[arm]["lone_p50_ms"] > summary["model_batch1_p50_ms"] and summary[arm]["errors"] == 0


def test_choice_latency(tiny_pipeline):
    """Both ways of timing the choice's speed-ups, quiet and with a core kept busy, on one depth."""
    teacher = make_tiny_model(tiny_pipeline["root"] / "choice-teacher", layers=3)
    out = tiny_pipeline["root"] / "choice_latency.json"
    run_benchmark("choice_latency.py", "--teacher", str(teacher), "--depths", "1", "--calls", "20", "--repeats", "1",
                  "--out", str(out))
    result = json.loads(out.read_text())
    assert [(r["repeat"], r["condition"]) for r in result["runs"]] == [(0, "quiet"), (0, "busy")]
    for method in ("before", "now"):
        entry = result["summary"][method]["1"]
        assert entry["quiet_median"] > 0 and entry["busy_median"] > 0 and len(entry["busy_over_quiet"]) == 1


def within(interval: list[float], value: float) -> bool:
    low, high = interval
    return 0 <= low <= value <= high <= 1


def other_texts(folder: Path, n: int) -> Path:
    """Unlabelled texts none of the splits hold (another seed of the fixture reviews), one per line."""
    reviews = make_reviews(n_movies=10, per_movie=4, seed=9)
    path = folder / "general.txt"
    path.write_text("\n".join(reviews[reviews["category"] != "plot"]["text"].iloc[:n]) + "\n")
    return path


@pytest.mark.slow
def test_fidelity_run(tiny_pipeline):
    """Teachers from two seeds, their agreement ceiling, and two 1-layer students (plain; transfer texts with the
    cosine loss, one student for both paths) distilled from the first, scored on the test and long sets."""
    root, data = tiny_pipeline["root"] / "fidelity", tiny_pipeline["data"]
    root.mkdir()
    teacher = make_tiny_model(root / "teacher", layers=2)
    plans = {"1 layer": {"layers": 1, "epochs": 1},
             "1 layer + transfer texts + cosine": {"layers": 1, "epochs": 1, "with_transfer": True,
                                                   "cosine_weight": 1.0}}
    out = root / "fidelity.json"
    run_benchmark("fidelity.py", "run", "--teacher", str(teacher), "--data", str(data),
                  "--transfer", str(other_texts(root, 20)), "--seeds", "1", "2", "--temperature", "2", "--alpha", "0.5",
                  "--learning-rate", "1e-3", "--max-length", "16", "--window-overlap", "4", "--max-windows", "4",
                  "--plans", json.dumps(plans), "--out", str(out))
    result = json.loads(out.read_text())
    tests, longs = (pd.read_parquet(data / f"{name}.parquet") for name in ("test", "test_long"))
    assert result["examples"] == {"test": len(tests), "long": len(longs)}
    assert 1 < result["long_windows_per_text"] <= 4  # the long texts span several 16-token windows, 4 at most
    assert set(result["teachers"]) == {"1", "2"} and list(result["teacher_pairs"]) == ["1-2"]
    assert result["teacher_agreement_ceiling_test"] == result["teacher_pairs"]["1-2"]["test"]
    low, high = result["teacher_accuracy_spread_test"]
    assert low <= high and {low, high} == {t["test"]["accuracy"] for t in result["teachers"].values()}
    assert list(result["students"]) == list(plans)
    train = len(pd.read_parquet(data / "train.parquet"))
    assert [s["train_examples"] for s in result["students"].values()] == [train, train + 20]
    for student in result["students"].values():
        assert student["layers"] == 1 and student["parameters"] > 0
        for set_name in ("test", "long"):
            scored = student[set_name]
            assert within(scored["accuracy_ci"], scored["accuracy"]) and 0 <= scored["agreement_with_teacher"] <= 1


@pytest.mark.slow
def test_fidelity_cpu_latency(tiny_pipeline):
    root = tiny_pipeline["root"] / "depths"
    teacher = make_tiny_model(root / "teacher", layers=2)
    out = root / "latency.json"
    run_benchmark("fidelity.py", "cpu-latency", "--teacher", str(teacher), "--data", str(tiny_pipeline["data"]),
                  "--depths", "1", "--texts", "10", "--repeats", "2", "--max-length", "16", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["what"].endswith("20 calls per depth")
    assert set(result["latency_p50_ms"]) == {"1", "2"} and all(v > 0 for v in result["latency_p50_ms"].values())
    assert result["speedup_vs_2_layers"]["2"] == 1.0 and result["speedup_vs_2_layers"]["1"] > 0


@pytest.mark.slow
def test_teacher_seeds(tiny_pipeline, tmp_path):
    """Two more teachers by the params' teacher recipe (a tiny model, one epoch), scored against a reference."""
    data = tiny_pipeline["data"]
    base = make_tiny_model(tmp_path / "base", layers=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 42, "max_length": 16, "teacher": {
        "model": str(base), "epochs": 1, "batch_size": 16, "learning_rate": 3e-3}}))
    out = tmp_path / "seeds.json"
    run_benchmark("teacher_seeds.py", "--seeds", "1", "2", "--params", str(params), "--data", str(data),
                  "--teacher", str(tiny_pipeline["student"]), "--general-texts", str(other_texts(tmp_path, 25)),
                  "--work", str(tmp_path / "work"), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["teacher"]["model"] == str(base) and result["teacher"]["seed"] == 42
    assert list(result["seeds"]) == ["1", "2"]
    tests = len(pd.read_parquet(data / "test.parquet"))
    for seed, entry in result["seeds"].items():
        assert entry["test_agreement"]["texts"] == tests and entry["general_text_agreement"]["texts"] == 25
        for name in ("test_agreement", "general_text_agreement"):
            assert within(entry[name]["ci"], entry[name]["value"])
        assert 0 <= entry["test_accuracy"] <= 1
        saved = json.loads((tmp_path / "work" / f"teacher-seed{seed}" / "distilops.json").read_text())
        assert saved["role"] == "teacher" and saved["seed"] == int(seed)


@pytest.mark.slow
def test_pipeline_timing(tmp_path):
    """`dvc repro -s -f` of two stages of a tiny copy of the repository: one timing a stage. (Up to distill took
    4.5 min on 2 busy cores, up to teacher 2.5 min: each stage a fresh interpreter importing the stack.)"""
    repo = RepoCopy(tmp_path / "repo")
    tiny_repo(repo)
    stages = ["prepare", "long_texts"]
    out = tmp_path / "timing.json"
    run_benchmark("pipeline_timing.py", "--project", str(repo.path), "--stages", *reversed(stages), "--out",
                  str(out), env=repo.env, timeout=600)
    result = json.loads(out.read_text())
    assert list(result["stage_seconds"]) == stages  # dvc.yaml's order, whatever order they were asked in
    assert all(seconds > 0 for seconds in result["stage_seconds"].values())
    assert result["total_seconds"] == pytest.approx(sum(result["stage_seconds"].values()), abs=0.2)
    assert result["up_to_trained_student_seconds"] is None  # distill was not timed: no partial sum stands for it
    assert result["params"]["max_length"] == TINY["max_length"]
    assert result["params"]["teacher"]["model"] == "tiny-teacher"
    assert (repo.path / "data/prepared/test_long.parquet").exists()  # the stages ran, forced, in the copy


def test_image_sizes_of_package_sets(tmp_path):
    """Package sets resolved by pip, offline, from a folder of tiny wheels; each wheel's installed size read from
    its zip directory. (The sizes podman reports of built images: tests/test_container.py.)"""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    size = {"torch-tiny": make_wheel(wheels, "torch-tiny", 300_000),
            "app": make_wheel(wheels, "app", 20_000, ("torch-tiny",)),
            "lean": make_wheel(wheels, "lean", 50_000)}
    sets = {"before (one image)": ["app"], "cpu": ["lean"], "gpu": ["app", "lean"]}
    out = tmp_path / "sizes.json"
    run_benchmark("image_sizes.py", "--sets", json.dumps(sets), "--find-links", str(wheels), "--out", str(out))
    result = json.loads(out.read_text())
    measured = result["python_packages"]
    assert list(measured) == list(sets) and result["images"] == {}
    for name, packages in {"before (one image)": ["torch-tiny", "app"], "cpu": ["lean"],
                           "gpu": ["torch-tiny", "lean", "app"]}.items():
        assert measured[name]["packages"] == len(packages)  # dependencies resolved in
        assert [p["name"] for p in measured[name]["largest"]] == packages  # largest first
        assert measured[name]["installed_mb"] == pytest.approx(sum(size[p] for p in packages) / 1e6, abs=0.1)
        assert measured[name]["download_mb"] < measured[name]["installed_mb"]
    assert measured["before (one image)"]["torch_or_cuda_mb"] == pytest.approx(0.3, abs=0.01)
    assert measured["cpu"]["torch_or_cuda_mb"] == 0
    assert result["ratios"]["cpu / before"] < 1 < result["ratios"]["gpu / before"]


@pytest.mark.slow
def test_live_fidelity(tiny_pipeline, tmp_path):
    """The served static int8 student shadowed by its ONNX teacher (a registry release of both, packaged as a pod
    gets it), two servers (shadow rate 0 and 1.0), one second of load an arm: the live agreement counts every
    test text once, and equals the offline agreement in the same batches of 16."""
    from distilops.release.registry import link_release, link_shadow, register_version
    from distilops.tracking import stage_run

    name, evaluated_as = "tiny-sentiment", "student_onnx_int8_static"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    teacher = export_teacher(tiny_pipeline["student"], tmp_path / "teacher_onnx")
    metrics = {"accuracy": 0.9, "teacher_accuracy": 0.9, "latency_p95_ms": 2.0}
    with pytest.MonkeyPatch.context() as patch:  # the caller's MLFLOW_TRACKING_URI comes back on the way out
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        with stage_run("register"):
            served = str(register_version(tiny_pipeline["onnx_int8_static"], model_name=name, metrics=metrics,
                                          variant="onnx_int8_static", role="serving", device="cpu").version)
            shadow = str(register_version(teacher, model_name=name, metrics=metrics, variant=TEACHER_VARIANT,
                                          role="teacher").version)
            link_release(name, {"cpu": served})
            link_shadow(name, [served, shadow], shadow)
    register, evaluation, out = tmp_path / "register.json", tmp_path / "evaluate.json", tmp_path / "live.json"
    register.write_text(json.dumps({"model_name": name, "serving_versions": {"cpu": served},
                                    "versions": {evaluated_as: {"version": served, "evaluated_as": evaluated_as}}}))
    evaluation.write_text(json.dumps({"models": {evaluated_as: {"agreement_with_teacher": 0.9,
                                                                "agreement_with_teacher_ci": [0.85, 0.95]}}}))
    run_benchmark("live_fidelity.py", "--data", str(tiny_pipeline["data"] / "test.parquet"), "--rates", "0,1.0",
                  "--clients", "2", "--seconds", "1", "--repeats", "1", "--register", str(register),
                  "--evaluation", str(evaluation), "--out", str(out), env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                  timeout=600)
    result = json.loads(out.read_text())
    agreement, texts = result["agreement"], len(pd.read_parquet(tiny_pipeline["data"] / "test.parquet"))
    assert (agreement["texts"], agreement["compared"], agreement["dropped"]) == (texts, texts, 0)
    assert agreement["live_agreement"] == agreement["offline_by_batch_size"]["16"]  # static int8: no batch effect
    assert agreement["difference_points"] == pytest.approx(100 * (agreement["live_agreement"] - 0.9))
    assert result["shadow"]["enabled"] and result["shadow"]["model"]["variant"] == TEACHER_VARIANT
    assert set(result["summary"]) == {"0", "1.0"} and list(result["ratios"]) == ["rate 1.0"]
    assert result["summary"]["0"]["2"]["compared"] == 0 < result["summary"]["1.0"]["2"]["compared"]
    for arm in result["summary"].values():
        assert arm["2"]["requests_per_second"] > 0 and arm["2"]["latency_p50_ms"] <= arm["2"]["latency_p99_ms"]
    assert all(mb > 0 for mb in result["memory_rss_mb"].values())


@pytest.mark.slow
def test_shadow_quota(tiny_pipeline, tmp_path):
    """The served static int8 student with its ONNX teacher as the shadow, every design at shadow rate 1.0, one
    second of load a run. Where cgroup v1's cpu controller is writable (root, as on this project's machines and
    CI), each server runs under its CFS quota and every run reports its throttling; elsewhere the same arms run
    without quotas, the throttling fields null and the reason given, never skipped."""
    teacher = export_teacher(tiny_pipeline["student"], tmp_path / "teacher_onnx")
    out = tmp_path / "quota.json"
    run_benchmark("shadow_quota.py", "--student", str(tiny_pipeline["onnx_int8_static"]), "--teacher", str(teacher),
                  "--data", str(tiny_pipeline["data"] / "test.parquet"), "--rates", "1.0", "--clients", "2",
                  "--seconds", "1", "--repeats", "1", "--out", str(out), timeout=600)
    result = json.loads(out.read_text())
    arms = {"off", "parallel 1.0", "serial 1.0", "room 1.0"}
    assert set(result["summary"]) == set(result["runs"]) == set(result["protocol"]["arms"]) == arms
    assert set(result["ratios"]) == {f"{arm} vs off" for arm in arms - {"off"}}
    shadow = result["shadow"]
    assert not shadow["off"]["enabled"] and all(shadow[arm]["enabled"] for arm in arms - {"off"})
    assert (shadow["serial 1.0"]["serial"], shadow["serial 1.0"]["batch"]) == (True, 4)
    assert (shadow["parallel 1.0"]["serial"], shadow["parallel 1.0"]["batch"]) == (False, 64)
    for arm, by_clients in result["runs"].items():
        (run,) = by_clients["2"]
        assert run["requests_per_second"] > 0 and run["errors"] == 0, (arm, run)
        assert run["latency_p50_ms"] <= run["latency_p99_ms"]
        assert (run["compared"] == 0) == (arm == "off"), (arm, run)  # rate 1.0: every shadowing arm compares
        if result["quota"]:
            quota = result["protocol"]["arms"][arm]["quota_cpus"]
            assert run["quota_cpus"] == quota == (2 if arm.startswith("room") else 1)
            assert 0 <= run["nr_throttled"] <= run["nr_periods"] and run["nr_periods"] > 0, (arm, run)
            assert run["throttled_share"] == run["nr_throttled"] / run["nr_periods"] and run["throttled_ms"] >= 0
            assert run["utilization_of_quota"] == pytest.approx(run["cores_busy"] / quota)
        else:
            assert "not writable" in result["cgroup"] and run["nr_periods"] is None and run["quota_cpus"] is None
    print("shadow_quota ran", "with quotas" if result["quota"] else f"without: {result['cgroup']}")


@pytest.mark.slow
def test_distributed_training(tmp_path):
    out = tmp_path / "distributed.json"
    run_benchmark("distributed_training.py", "--processes", "1", "2", "--rounds", "1", "--examples", "160",
                  "--layers", "1", "--hidden", "32", "--out", str(out))
    summary = json.loads(out.read_text())["summary"]
    assert summary["1"]["steps"] == summary["2"]["steps"] == 3  # 96 training examples, batch 32
    assert summary["2"]["max_abs_loss_diff_vs_1"] < 1e-5 and summary["2"]["wall_seconds_median"] > 0
