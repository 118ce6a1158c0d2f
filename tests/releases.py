"""Releases as `distilops register` and `distilops image --push` leave them: two releases of a tiny model, each
a CPU version and its GPU sibling with an image recorded, in a real SQLite MLflow registry (test_deploy.py,
test_control_plane.py)."""

from __future__ import annotations

from pathlib import Path

from tiny import distinct, make_tiny_model

from distilops.config import PromoteConfig
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.release.registry import client, link_release, promote, register_version
from distilops.tracking import stage_run

NAME = "tiny-sentiment"
PUSHED_TO = "registry.example.com/ml"
GATES = PromoteConfig(model_name=NAME, max_latency_p95_ms=20.0)
METRICS = {"accuracy": 0.85, "teacher_accuracy": 0.86, "latency_p95_ms": 2.0}


def make_releases(tmp_path: Path, monkeypatch, count: int = 2) -> list[dict[str, str]]:  # noqa: ANN001 (MonkeyPatch)
    """`count` releases, each a CPU version and its GPU sibling, each with an image recorded; release 1
    promoted. Returns [{device: version}] per release."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DISTILOPS_USER", "alice")
    raw = make_tiny_model(tmp_path / "raw")
    folder = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), tmp_path / "student",
                               max_length=16, teacher="tiny-teacher")
    releases = []
    c = client()  # points MLflow at this test's store (a client made before would keep the last test's)
    with stage_run("register"):
        for _ in range(count):
            versions = {}
            for device, variant in (("cpu", "onnx_int8"), ("gpu", "onnx_fp16")):
                mv = register_version(distinct(folder), model_name=NAME, metrics=METRICS,
                                      variant=variant, role="serving", device=device)
                versions[device] = str(mv.version)
                record_image(c, mv.version, device)
            link_release(NAME, versions)
            releases.append(versions)
    promote(NAME, GATES, version=releases[0]["cpu"])
    return releases


def record_image(c, version: str, device: str, *, registry: str = PUSHED_TO, image_id: str = "") -> str:  # noqa: ANN001
    """What `distilops image --push REGISTRY` records on a version; returns the digest it "pushed"."""
    tag = f"v{version}-{device}"
    image_id = image_id or f"{int(version):064x}"
    digest = "sha256:" + f"{int(version) + 100:064x}"
    tags = {"image.ref": f"localhost/distilops-classifier:{tag}", "image.id": image_id,
            "image.pushed": f"{registry}/distilops-classifier:{tag}", "image.pushed_digest": digest,
            "image.pushed_id": image_id}
    for key, value in tags.items():
        c.set_model_version_tag(NAME, version, key, value)
    return digest
