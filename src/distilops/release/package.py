"""Registry -> BentoML model store: the version an alias names becomes an immutable Bento model.

`bentoml build` then bakes that model into the Bento, so a pod serves exactly the model it was
built with and never needs the registry at run time. The Bento model is labelled with the
registry name and version and carries the version's lineage and metrics as metadata.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bentoml
import mlflow
from bentoml.exceptions import NotFound
from mlflow.entities.model_registry import ModelVersion

from distilops.errors import RegistryError
from distilops.hashing import folder_sha256
from distilops.release.registry import (
    VARIANT,
    alias_version,
    client,
    get_version,
    version_for_device,
    version_metrics,
)
from distilops.serving.folder import MODEL_SUBDIR, find_model_folder, read_meta
from distilops.tracking import redact_uri


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


def import_model_folder(folder: Path, tag: str, *, labels: dict[str, str], metadata: dict) -> str:
    """Copy a model folder into the BentoML model store as `tag` (replacing one with the same tag)."""
    with contextlib.suppress(NotFound):
        bentoml.models.delete(tag)  # same version and bytes: re-create it so it becomes `latest`
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as bento_model:
        shutil.copytree(folder, Path(bento_model.path) / MODEL_SUBDIR)
    return tag


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
            bento_model_name: str | None = None) -> Packaged:
    """Import the version serving `device` in `model_name@alias`'s release (or in an explicit version's)
    into the BentoML model store; returns its tag.

    The tag is `<name>:v<registry version>-<content hash>`; packaging the same version again
    re-creates it, so it is also the store's `latest` (what `bentoml build` and `serve` pick).
    """
    release, mv = resolve(model_name, alias=alias, version=version, device=device)
    with tempfile.TemporaryDirectory(prefix="distilops-package-") as tmp:
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{mv.version}", dst_path=tmp))
        folder = find_model_folder(downloaded)
        meta = read_meta(folder)
        tag = f"{bento_model_name or model_name}:v{mv.version}-{folder_sha256(folder)[:10]}"
        labels = {"registry_name": model_name, "registry_version": str(mv.version),
                  "release_version": str(release.version), "alias": alias if version is None else "",
                  "variant": mv.tags.get(VARIANT, "?"), "device": device, "format": meta.get("format", "pytorch")}
        metadata = {**dict(mv.tags), "metrics": version_metrics(mv), "source": f"models:/{model_name}/{mv.version}",
                    "tracking_uri": redact_uri(mlflow.get_tracking_uri()), "mlflow_run_id": mv.run_id or "",
                    "max_length": meta.get("max_length")}
        import_model_folder(folder, tag, labels=labels, metadata=metadata)
    return Packaged(tag=tag, registry_name=model_name, registry_version=str(mv.version), variant=labels["variant"],
                    device=device, format=labels["format"], release_version=str(release.version),
                    path=str(bentoml.models.get(tag).path))
