"""Registry -> BentoML model store: the version an alias names becomes an immutable Bento model.

`bentoml build` then bakes that model into the Bento, so a pod serves exactly the model it was
built with and never needs the registry at run time. The Bento model is labelled with the
registry name and version and carries the version's lineage and metrics as metadata.

With `shadow` (the default), the release's teacher version (tag `release.shadow`: its ONNX export,
registered by the register stage) is copied in too, as `shadow/` beside `model/`: the service may score a
sampled fraction of its texts with it (DISTILOPS_SHADOW_RATE) to measure its live agreement with the
teacher. It costs the teacher's size in the Bento and the image, nothing at run time while the rate is 0.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bentoml
import mlflow
from bentoml.exceptions import NotFound
from mlflow.entities.model_registry import ModelVersion

from distilops.errors import RegistryError
from distilops.hashing import folder_sha256, sha256
from distilops.release.registry import (
    SHADOW_TAG,
    VARIANT,
    alias_version,
    client,
    get_version,
    version_for_device,
    version_metrics,
)
from distilops.serving.folder import MODEL_SUBDIR, SHADOW_SUBDIR, find_model_folder, read_meta
from distilops.tracking import redact_uri

log = logging.getLogger(__name__)


@dataclass
class Packaged:
    tag: str
    registry_name: str
    registry_version: str
    variant: str
    device: str
    format: str
    release_version: str  # the promoted (CPU) version whose release this is
    path: str
    shadow_version: str = ""  # the release's teacher version carried as shadow/; "" = none


def import_model_folder(folder: Path, tag: str, *, labels: dict[str, str], metadata: dict,
                        shadow: Path | None = None) -> str:
    """Copy a model folder (and a shadow model folder beside it) into the BentoML model store as `tag`
    (replacing one with the same tag)."""
    with contextlib.suppress(NotFound):
        bentoml.models.delete(tag)  # same version and bytes: re-create it so it becomes `latest`
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as bento_model:
        shutil.copytree(folder, Path(bento_model.path) / MODEL_SUBDIR)
        if shadow is not None:
            shutil.copytree(shadow, Path(bento_model.path) / SHADOW_SUBDIR)
    return tag


def download_folder(model_name: str, version: str, into: Path) -> Path:
    """The model folder of a registered version, downloaded under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    return find_model_folder(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(into)))


def shadow_version(model_name: str, release: ModelVersion, mv: ModelVersion) -> str:
    """The release's teacher version (`release.shadow`), or "" (logged) when it has none or `mv` is that teacher."""
    found = mv.tags.get(SHADOW_TAG) or release.tags.get(SHADOW_TAG) or ""
    if not found:
        log.info("%s v%s's release has no shadow version (tag %s): packaged without a shadow model", model_name,
                 release.version, SHADOW_TAG)
    return "" if found == str(mv.version) else found


def content_hash(folder: Path, shadow: Path | None) -> str:
    """What the tag's hash covers: the model folder, and the shadow's when one rides along."""
    return folder_sha256(folder) if shadow is None else sha256([folder_sha256(folder), folder_sha256(shadow)])


def resolve(model_name: str, *, alias: str = "production", version: str | None = None,
            device: str = "cpu") -> tuple[ModelVersion, ModelVersion]:
    """(the release's version: the alias's or the one named; the version serving `device` in that release)."""
    c = client()
    if version is None:
        release = alias_version(c, model_name, alias)
        if release is None:
            raise RegistryError(f"'{model_name}@{alias}' points at no version: promote one first "
                                f"(`distilops promote`)")
    else:
        release = get_version(c, model_name, version)
    return release, version_for_device(c, model_name, release, device)


def package(model_name: str, *, alias: str = "production", version: str | None = None, device: str = "cpu",
            bento_model_name: str | None = None, shadow: bool = True) -> Packaged:
    """Import the version serving `device` in `model_name@alias`'s release (or in an explicit version's)
    into the BentoML model store, with the release's teacher as `shadow/` when `shadow` and the release has
    one; returns its tag.

    The tag is `<name>:v<registry version>-<content hash>` (the hash covers the shadow too); packaging the
    same version again re-creates it, so it is also the store's `latest` (what `bentoml build` and `serve` pick).
    """
    release, mv = resolve(model_name, alias=alias, version=version, device=device)
    shadow_of = shadow_version(model_name, release, mv) if shadow else ""
    with tempfile.TemporaryDirectory(prefix="distilops-package-") as tmp:
        folder = download_folder(model_name, str(mv.version), Path(tmp) / "served")
        shadow_folder = download_folder(model_name, shadow_of, Path(tmp) / "shadow") if shadow_of else None
        if shadow_folder is not None and read_meta(shadow_folder).get("format") != "onnx":
            raise RegistryError(f"shadow version {shadow_of} of '{model_name}' is not an ONNX model: the serving "
                                "image runs ONNX only (package with --no-shadow)")
        meta = read_meta(folder)
        tag = f"{bento_model_name or model_name}:v{mv.version}-{content_hash(folder, shadow_folder)[:10]}"
        labels = {"registry_name": model_name, "registry_version": str(mv.version),
                  "release_version": str(release.version), "alias": alias if version is None else "",
                  "variant": mv.tags.get(VARIANT, "?"), "device": device, "format": meta.get("format", "pytorch"),
                  "shadow_version": shadow_of}
        metadata = {**dict(mv.tags), "metrics": version_metrics(mv), "source": f"models:/{model_name}/{mv.version}",
                    "tracking_uri": redact_uri(mlflow.get_tracking_uri()), "mlflow_run_id": mv.run_id or "",
                    "max_length": meta.get("max_length"),
                    "shadow_source": f"models:/{model_name}/{shadow_of}" if shadow_of else ""}
        import_model_folder(folder, tag, labels=labels, metadata=metadata, shadow=shadow_folder)
    return Packaged(tag=tag, registry_name=model_name, registry_version=str(mv.version), variant=labels["variant"],
                    device=device, format=labels["format"], release_version=str(release.version),
                    path=str(bentoml.models.get(tag).path), shadow_version=shadow_of)
