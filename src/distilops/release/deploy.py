"""`distilops deploy`: the production version's image into a Kubernetes overlay, pinned and validated.

    alias (production) -> release version -> the version serving the overlay's device -> its image
    -> k8s/overlays/<cpu|gpu> rendered by `kubectl kustomize`, the image pinned by the digest its registry
    reports (release/oci.py), the registry version as a pod label and annotation -> strict schema validation
    -> printed, or `kubectl apply` + `kubectl rollout status` + /model checked through the Service.

Pinning a new tag changes the pod template, so re-applying rolls the pods; after `distilops promote
--rollback`, deploy renders the previous version's image, and applying it rolls back the cluster too.
`kubectl rollout history` shows the registry version in CHANGE-CAUSE.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import yaml

from distilops.commands import run_command
from distilops.errors import DeployError
from distilops.release.image import (
    IMAGE_ID,
    IMAGE_NAME,
    IMAGE_REF,
    PUSHED,
    PUSHED_DIGEST,
    PUSHED_ID,
    in_registry,
    registry_of,
)
from distilops.release.oci import manifest_digest
from distilops.release.package import resolve
from distilops.release.registry import DEVICES, VARIANT

log = logging.getLogger(__name__)
K8S = Path("k8s")
SCHEMA_VERSIONS = ("1.30.0", "1.33.0")
LABEL = "distilops.ai/registry-version"


@dataclass
class Rendered:
    documents: list[dict]
    image: str
    registry_name: str
    version: str  # the registry version the pods serve
    release: str  # the promoted version whose release it is
    device: str

    def yaml(self) -> str:
        return yaml.safe_dump_all(self.documents, sort_keys=False)


def kubectl(*args: str, what: str, stdin: str | None = None, timeout: float | None = None) -> str:
    return run_command(["kubectl", *args], what=f"{what} failed", error=DeployError, input=stdin, timeout=timeout,
                       missing="deploy renders overlays with `kubectl kustomize` (kubectl >= 1.27)",
                       tail_lines=20).stdout


def render_overlay(overlay: str, root: Path = K8S) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(kubectl("kustomize", str(root / "overlays" / overlay),
                                                      what=f"kubectl kustomize overlays/{overlay}")) if doc]


def image_reference(tags: dict[str, str], registry: str | None, version: str, *, check: bool = True,
                    tls_verify: bool = True) -> str:
    """The image pods pull, pinned by digest: the version's image in `registry` (default: where it was pushed).

    Refused, with the fix named: a version never built or never pushed; a build newer than the last push
    (its pods would run the old one); with `check`, a tag the registry does not hold, or a tag that now
    names another image than the one pushed for this version. Without `check` (no access to the
    registry), the digest recorded at the push is pinned."""
    local = tags.get(IMAGE_REF)
    if not local:
        raise DeployError(f"version {version} has no image: build it first (`distilops image --version {version} "
                          "--device ...`), then push it to your registry (`--push REGISTRY`)")
    registry = registry or (registry_of(tags[PUSHED]) if tags.get(PUSHED) else None)
    if not registry:
        raise DeployError(f"version {version}'s image {local} was never pushed, and no node can pull a local image: "
                          f"`distilops image --version {version} --push REGISTRY`, then deploy again")
    ref = in_registry(registry, local.rsplit(":", 1)[1])
    recorded = tags.get(PUSHED_DIGEST, "") if tags.get(PUSHED) == ref else ""
    if recorded and tags.get(PUSHED_ID) and tags.get(PUSHED_ID) != tags.get(IMAGE_ID):
        raise DeployError(f"version {version}'s image was rebuilt ({tags.get(IMAGE_ID, '?')[:12]}) after it was pushed "
                          f"to {ref} ({tags[PUSHED_ID][:12]}): push the new build (`distilops image --version "
                          f"{version} --push {registry}`) so the cluster runs what was built")
    if not check:
        if not recorded:
            raise DeployError(f"no push of version {version}'s image to {registry} is recorded: push it there, or let "
                              "deploy ask the registry (without --skip-registry-check)")
        return f"{ref}@{recorded}"
    found = manifest_digest(ref, tls_verify=tls_verify)
    if found is None:
        raise DeployError(f"{ref} is not in the registry: push it first (`distilops image --version {version} "
                          f"--push {registry}`)")
    if recorded and found != recorded:
        raise DeployError(f"{ref} now names {found[:19]}..., not the image pushed for version {version} "
                          f"({recorded[:19]}...): the tag was overwritten; push this version's image again")
    return f"{ref}@{found}"


def pin(documents: list[dict], *, image: str, registry_name: str, version: str, release: str, variant: str) -> None:
    """Set the classifier's image and mark its pods with the registry version (label, annotations)."""
    deployments = [d for d in documents if d["kind"] == "Deployment"]
    if len(deployments) != 1:
        raise DeployError(f"the overlay must hold one Deployment, found {len(deployments)}")
    deployment = deployments[0]
    cause = f"{registry_name} v{version} ({variant}), release v{release}, image {image}"
    deployment["metadata"].setdefault("annotations", {})["kubernetes.io/change-cause"] = cause
    template = deployment["spec"]["template"]
    template["metadata"].setdefault("labels", {})[LABEL] = version
    template["metadata"].setdefault("annotations", {}).update({
        "distilops.ai/registry-model": registry_name, "distilops.ai/registry-version": version,
        "distilops.ai/release-version": release, "distilops.ai/variant": variant})
    containers = template["spec"]["containers"]
    for container in containers:
        if container["image"].split("@")[0].rsplit(":", 1)[0].endswith(IMAGE_NAME):
            container["image"] = image
            break
    else:
        raise DeployError(f"no container running the {IMAGE_NAME} image in the Deployment")


def validate(documents: list[dict], versions: tuple[str, ...] = SCHEMA_VERSIONS) -> None:
    """Strict validation against the official Kubernetes schemas (unknown fields, wrong types): offline."""
    for doc in documents:
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise DeployError(f"{doc['kind']}/{doc['metadata']['name']} fails Kubernetes {version}'s schema: "
                                  f"{exc.message} (at {'.'.join(map(str, exc.path))})") from None


def render(model_name: str, *, overlay: str, alias: str = "production", version: str | None = None,
           registry: str | None = None, root: Path = K8S, check_registry: bool = True,
           tls_verify: bool = True) -> Rendered:
    if overlay not in DEVICES:  # k8s/overlays/<device>: one overlay per device
        raise DeployError(f"unknown overlay '{overlay}': use one of {sorted(DEVICES)}")
    device = overlay
    release, served = resolve(model_name, alias=alias, version=version, device=device)
    image = image_reference(served.tags, registry, served.version, check=check_registry, tls_verify=tls_verify)
    documents = render_overlay(overlay, root)
    pin(documents, image=image, registry_name=model_name, version=str(served.version), release=str(release.version),
        variant=served.tags.get(VARIANT, "?"))
    validate(documents)
    return Rendered(documents, image, model_name, str(served.version), str(release.version), device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply(rendered: Rendered, *, timeout_s: int = 600) -> dict:
    """kubectl apply, wait for the rollout, then ask the Service which version answers (via port-forward)."""
    kubectl("apply", "-f", "-", what="kubectl apply", stdin=rendered.yaml())
    deployment = next(d for d in rendered.documents if d["kind"] == "Deployment")
    namespace, name = deployment["metadata"].get("namespace", "default"), deployment["metadata"]["name"]
    kubectl("rollout", "status", f"deployment/{name}", "-n", namespace, f"--timeout={timeout_s}s",
            what="kubectl rollout status", timeout=timeout_s + 30)
    service = next(d for d in rendered.documents if d["kind"] == "Service")
    port = free_port()
    forward = subprocess.Popen(["kubectl", "port-forward", "-n", namespace, f"service/{service['metadata']['name']}",
                                f"{port}:{service['spec']['ports'][0]['port']}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=5) as reply:
                    served = json.loads(reply.read())
                break
            except OSError as exc:
                if time.monotonic() > deadline or forward.poll() is not None:
                    raise DeployError(f"the rollout finished but /model did not answer through the Service: "
                                      f"{exc}") from None
                time.sleep(1)
    finally:
        forward.terminate()
    if str(served.get("registry_version")) != rendered.version:
        raise DeployError(f"the Service answers with version {served.get('registry_version')}, expected "
                          f"{rendered.version}: old pods still serving?")
    return served
