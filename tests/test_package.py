"""`distilops package` as a user runs it (a real process, a SQLite registry, a BentoML store of its own): the
release's teacher rides along as `shadow/` beside `model/`, labelled with its version; --no-shadow and a
release without a teacher version package the served model alone, and say so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import distinct, make_tiny_model

from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.quantize import TEACHER_VARIANT, build, export_teacher
from distilops.release.registry import TEACHER_ROLE, link_release, link_shadow, register_version
from distilops.serving.folder import MODEL_SUBDIR, SHADOW_SUBDIR, read_meta
from distilops.serving.inference import TextClassifier
from distilops.tracking import stage_run

pytestmark = pytest.mark.slow
NAME = "tiny-sentiment"
DISTILOPS = str(Path(sys.executable).parent / "distilops")
METRICS = {"accuracy": 0.85, "teacher_accuracy": 0.86, "latency_p95_ms": 2.0}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Release 1: CPU v1 and its teacher v2 (release.shadow = 2 on both). Release 2: CPU v3, no teacher."""
    root = tmp_path_factory.mktemp("package")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "BENTOML_HOME": str(root / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true"}
    with pytest.MonkeyPatch.context() as patch:  # the caller's MLFLOW_TRACKING_URI comes back on the way out
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        raw = make_tiny_model(root / "raw")
        student = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), root / "student",
                                    max_length=16, teacher="tiny-teacher")
        served = build("onnx_int8", student, root / "quantized")
        raw_teacher = make_tiny_model(root / "raw_teacher", seed=1)
        teacher = save_model_folder(load_classifier(str(raw_teacher)), load_tokenizer(str(raw_teacher)),
                                    root / "teacher", max_length=16, role="teacher")
        teacher_onnx = export_teacher(teacher, root / "teacher_onnx")
        with stage_run("register"):
            cpu = register_version(served, model_name=NAME, metrics=METRICS, variant="onnx_int8", role="serving",
                                   device="cpu").version
            shadow = register_version(teacher_onnx, model_name=NAME, metrics=METRICS, variant=TEACHER_VARIANT,
                                      role=TEACHER_ROLE).version
            link_release(NAME, {"cpu": str(cpu)})
            link_shadow(NAME, [str(cpu), str(shadow)], str(shadow))
            alone = register_version(distinct(served), model_name=NAME, metrics=METRICS, variant="onnx_int8",
                                     role="serving", device="cpu").version
            link_release(NAME, {"cpu": str(alone)})
    params = root / "params.yaml"
    params.write_text(f"model_name: {NAME}\npromote:\n  alias: production\n")
    return root, env, params


def package(registry, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`distilops package ARGS`; returns the process and the Bento model's directory in the store."""
    root, env, params = registry
    done = subprocess.run([DISTILOPS, "package", *args, "--params", str(params)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    name, version = done.stdout.strip().splitlines()[-1].split(":")
    return done, Path(env["BENTOML_HOME"]) / "models" / name / version


def labels(bento_model: Path) -> dict:
    return yaml.safe_load((bento_model / "model.yaml").read_text())["labels"]


def test_the_release_teacher_rides_along_as_shadow(registry):
    done, bento_model = package(registry, "--version", "1")
    assert "packaged tiny-sentiment v1 (onnx_int8, cpu, shadow: teacher v2)" in done.stderr
    assert labels(bento_model)["shadow_version"] == "2" and labels(bento_model)["registry_version"] == "1"
    shadow = bento_model / SHADOW_SUBDIR
    assert read_meta(shadow)["variant"] == TEACHER_VARIANT and read_meta(shadow)["role"] == "teacher"
    teacher = TextClassifier(shadow, device="cpu")  # what the service would load: ONNX, no torch
    assert teacher.format == "onnx" and len(teacher.classify(["a wonderful film", "dull"])) == 2
    assert read_meta(bento_model / MODEL_SUBDIR)["variant"] == "onnx_int8"


def test_no_shadow_and_a_release_without_one_package_the_served_model_alone(registry):
    with_shadow = package(registry, "--version", "1")[1]
    done, bento_model = package(registry, "--version", "1", "--no-shadow")
    assert "(onnx_int8, cpu, no shadow)" in done.stderr and "has no shadow version" not in done.stderr
    assert not (bento_model / SHADOW_SUBDIR).exists() and (bento_model / MODEL_SUBDIR).is_dir()
    assert labels(bento_model)["shadow_version"] == "" and bento_model.name != with_shadow.name  # other bytes, tag

    done, bento_model = package(registry, "--version", "3")
    assert "tiny-sentiment v3's release has no shadow version (tag release.shadow): packaged without" in done.stderr
    assert not (bento_model / SHADOW_SUBDIR).exists() and labels(bento_model)["shadow_version"] == ""


def test_the_shadow_option_says_what_it_costs():
    shown = subprocess.run([DISTILOPS, "package", "--help"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "COLUMNS": "200"})
    assert "--shadow" in shown.stdout and "--no-shadow" in shown.stdout
    assert "DISTILOPS_SHADOW_RATE" in shown.stdout and "teacher's size" in " ".join(shown.stdout.split())
