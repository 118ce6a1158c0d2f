"""`distilops deploy`: the production version's image into a Kubernetes overlay, pinned and validated.

    alias (production) -> release version -> the version serving the overlay's device -> its image
    -> k8s/overlays/<cpu|gpu> rendered by `kubectl kustomize`, the image pinned by the digest its registry
    reports (release/oci.py), the registry version as a pod label and annotation -> strict schema validation
    -> printed, or applied (server-side, Kubernetes Python client: cluster.py), the rollout waited on, and
    /model checked through the Service.

`--strategy canary` renders k8s/overlays/<device>-canary instead: the same Deployment (image pinned there as
above), and an Argo Rollout that takes its pod template from it and releases each new template as a canary,
judged live against the stable by the AnalysisTemplate (k8s/components/canary). Applied (`apply_canary`):
the version the cluster serves is read first, the Rollout followed until promoted or aborted, and the outcome
recorded in the promotion history; an abort moves the registry alias back to the version still served.

`render_jobs` does the same for k8s/jobs: the pipeline image pinned by the digest its registry reports, so a
retried pod runs the very image (and run key) its first attempt ran.

Pinning a new tag changes the pod template, so re-applying rolls the pods; after `distilops promote
--rollback`, deploy renders the previous version's image, and applying it rolls back the cluster too.
`kubectl rollout history` shows the registry version in CHANGE-CAUSE.
"""

from __future__ import annotations

import functools
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
from distilops.config import Distributed
from distilops.errors import DeployError
from distilops.release import cluster
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
from distilops.release.registry import DEVICES, VARIANT, PromotionEvent, record_canary

log = logging.getLogger(__name__)
K8S = Path("k8s")
SCHEMA_VERSIONS = ("1.30.0", "1.33.0")
LABEL = "distilops.ai/registry-version"
RELEASE_ANNOTATION = "distilops.ai/release-version"
STRATEGIES = ("rolling", "canary")  # rolling: k8s/overlays/<device>; canary: k8s/overlays/<device>-canary


@dataclass
class Rendered:
    documents: list[dict]
    image: str
    registry_name: str
    version: str  # the registry version the pods serve
    release: str  # the promoted version whose release it is
    device: str
    strategy: str = "rolling"

    def yaml(self) -> str:
        return yaml.safe_dump_all(self.documents, sort_keys=False)


def kustomize(folder: Path) -> list[dict]:
    """The documents `kubectl kustomize folder` renders."""
    out = run_command(["kubectl", "kustomize", str(folder)], what=f"kubectl kustomize {folder} failed",
                      error=DeployError, missing="deploy renders overlays with `kubectl kustomize` (kubectl >= 1.27)",
                      tail_lines=20).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_overlay(overlay: str, root: Path = K8S) -> list[dict]:
    return kustomize(root / "overlays" / overlay)


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
        RELEASE_ANNOTATION: release, "distilops.ai/variant": variant})
    containers = template["spec"]["containers"]
    for container in containers:
        if container["image"].split("@")[0].rsplit(":", 1)[0].endswith(IMAGE_NAME):
            container["image"] = image
            break
    else:
        raise DeployError(f"no container running the {IMAGE_NAME} image in the Deployment")


# Custom resources are checked against their projects' published CRDs, vendored at a pinned release in crds/:
#   monitoring.coreos.com_podmonitors.yaml, monitoring.coreos.com_prometheusrules.yaml
#       prometheus-operator v0.93.0 (f8fafd475f3d132e239432ae6172de60a6cb6516), example/prometheus-operator-crd/
#   argoproj.io_rollouts.yaml, argoproj.io_analysistemplates.yaml
#       Argo Rollouts v1.9.1 (b6bd3bcf8f60d717a98763d26acc983db7f97cb0), manifests/crds/rollout-crd.yaml and
#       analysis-template-crd.yaml
CRDS = Path(__file__).parent / "crds"


def strict(schema: dict) -> dict:
    """A CRD's OpenAPI schema that refuses unknown fields, as the API server prunes or rejects them: every
    object with `properties` and no `additionalProperties` or x-kubernetes-preserve-unknown-fields is closed."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache  # parsed once per process: validate runs for every render, and CRDs are large YAML
def custom_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict schema, for every version each vendored CRD serves (read-only)."""
    schemas = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the Argo CRDs (200 kB each) in ms, not s
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server
                schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = schema
    return schemas


def validate_custom(doc: dict, schema: dict) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(doc))
    if error is not None:
        raise DeployError(f"{doc['kind']}/{doc['metadata']['name']} fails its CRD schema: {error.message} "
                          f"(at {'.'.join(map(str, error.absolute_path))})")


def validate(documents: list[dict], versions: tuple[str, ...] = SCHEMA_VERSIONS) -> None:
    """Strict validation against the official Kubernetes schemas (unknown fields, wrong types), and custom
    resources against their vendored CRDs: offline."""
    customs = custom_schemas()
    for doc in documents:
        if (doc.get("apiVersion"), doc.get("kind")) in customs:
            validate_custom(doc, customs[(doc["apiVersion"], doc["kind"])])
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise DeployError(f"{doc['kind']}/{doc['metadata']['name']} fails Kubernetes {version}'s schema: "
                                  f"{exc.message} (at {'.'.join(map(str, exc.path))})") from None


def render(model_name: str, *, overlay: str, alias: str = "production", version: str | None = None,
           registry: str | None = None, root: Path = K8S, check_registry: bool = True,
           tls_verify: bool = True, strategy: str = "rolling") -> Rendered:
    if overlay not in DEVICES:  # k8s/overlays/<device>: one overlay per device
        raise DeployError(f"unknown overlay '{overlay}': use one of {sorted(DEVICES)}")
    if strategy not in STRATEGIES:
        raise DeployError(f"unknown strategy '{strategy}': use one of {list(STRATEGIES)}")
    device = overlay
    release, served = resolve(model_name, alias=alias, version=version, device=device)
    image = image_reference(served.tags, registry, served.version, check=check_registry, tls_verify=tls_verify)
    documents = render_overlay(overlay if strategy == "rolling" else f"{overlay}-canary", root)
    # The canary overlay holds the same Deployment: the Rollout takes its pod template from it (workloadRef).
    pin(documents, image=image, registry_name=model_name, version=str(served.version), release=str(release.version),
        variant=served.tags.get(VARIANT, "?"))
    validate(documents)
    return Rendered(documents, image, model_name, str(served.version), str(release.version), device, strategy)


PIPELINE_IMAGE = "distilops-pipeline"


def job_containers(documents: list[dict]) -> list[dict]:
    """Every container (init containers too) of every Job among the documents."""
    return [c for doc in documents if doc["kind"] == "Job"
            for c in (*doc["spec"]["template"]["spec"].get("initContainers", []),
                      *doc["spec"]["template"]["spec"]["containers"])]


def pinned_pipeline_image(image: str, *, check_registry: bool = True, tls_verify: bool = True) -> str:
    """`image` (REGISTRY/PATH/distilops-pipeline:TAG) pinned by the digest the registry reports for the tag, or the
    digest given as IMAGE@sha256:..."""
    name = image.split("@")[0]
    if "@sha256:" in image:
        return image
    if not check_registry:
        raise DeployError(f"{image} is a tag: without asking the registry, give the digest (IMAGE@sha256:...)")
    if ":" not in name.rsplit("/", 1)[-1]:
        raise DeployError(f"{image}: name the tag you pushed (REGISTRY/PATH/{PIPELINE_IMAGE}:TAG)")
    digest = manifest_digest(name, tls_verify=tls_verify)
    if digest is None:
        raise DeployError(f"{name} is not in the registry: build and push the pipeline image first "
                          "(k8s/jobs/Dockerfile)")
    return f"{name.rsplit(':', 1)[0]}@{digest}"


def render_jobs(image: str, *, root: Path = K8S, check_registry: bool = True, tls_verify: bool = True,
                folder: str = "jobs", training: Distributed | None = None) -> list[dict]:
    """k8s/jobs (or another folder of pipeline Jobs: k8s/train) with every pipeline container on `image` pinned
    (`pinned_pipeline_image`), validated offline. `training`: k8s/train's Job sized by it (`size_training`)."""
    pinned = pinned_pipeline_image(image, check_registry=check_registry, tls_verify=tls_verify)
    documents = kustomize(root / folder)
    containers = job_containers(documents)
    for container in containers:
        if PIPELINE_IMAGE in container["image"]:
            container["image"] = pinned
    if not any(c["image"] == pinned for c in containers):
        raise DeployError(f"no container in k8s/{folder} runs the {PIPELINE_IMAGE} image")
    if training is not None:
        size_training(documents, training)
    validate(documents)
    return documents


TRAIN_JOB = "distilops-train"
GPU = "nvidia.com/gpu"


def size_training(documents: list[dict], cfg: Distributed) -> None:
    """k8s/train's Job made the shape params.yaml's teacher.distributed asks: one pod per node, all at once, each
    asking for a GPU per process. With backend gloo the processes run on CPUs: no GPU asked, no GPU node sought."""
    jobs = [d for d in documents if d["kind"] == "Job" and d["metadata"]["name"] == TRAIN_JOB]
    if len(jobs) != 1:
        raise DeployError(f"k8s/train must hold the Job {TRAIN_JOB}, found {len(jobs)}")
    spec = jobs[0]["spec"]
    spec["completions"] = spec["parallelism"] = cfg.nodes
    pod = spec["template"]["spec"]
    for container in pod["containers"]:
        for kind in ("requests", "limits"):
            if cfg.backend == "gloo":
                container["resources"][kind].pop(GPU, None)
            else:
                container["resources"][kind][GPU] = cfg.processes
    if cfg.backend == "gloo":
        for key in ("runtimeClassName", "nodeSelector", "tolerations"):
            pod.pop(key, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_CHECK_S = 30  # after the rollout, at least this long for /model to answer through the Service


def apply(rendered: Rendered, *, timeout_s: int = 600) -> dict:
    """Server-side apply, wait for the rollout, then ask the Service which version answers (via port-forward)."""
    started = time.monotonic()
    cluster.apply(rendered.documents)
    deployment = next(d for d in rendered.documents if d["kind"] == "Deployment")
    namespace, name = deployment["metadata"].get("namespace", "default"), deployment["metadata"]["name"]
    cluster.wait_rollout(namespace, name, timeout_s=timeout_s)
    service = next(d for d in rendered.documents if d["kind"] == "Service")
    deadline = max(started + timeout_s, time.monotonic() + MODEL_CHECK_S)
    served = model_through_service(namespace, service["metadata"]["name"], service["spec"]["ports"][0]["port"],
                                   deadline=deadline)
    if str(served.get("registry_version")) != rendered.version:
        raise DeployError(f"the Service answers with version {served.get('registry_version')}, expected "
                          f"{rendered.version}: old pods still serving?")
    return served


def model_through_service(namespace: str, service: str, port: int, *, deadline: float) -> dict:
    """GET /model through `kubectl port-forward service/...` (the API server, then the node's kubelet, to one
    of the Service's pods), retried until `deadline`: a pod Ready by its probe may still be warming, and a
    forward whose pod went away (an old replica) is started again, to a pod the Service selects now."""
    local, error = free_port(), ""
    while True:
        try:
            forward = subprocess.Popen(["kubectl", "port-forward", "-n", namespace, f"service/{service}",
                                        f"{local}:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
        except FileNotFoundError:
            raise DeployError("kubectl not found: the /model check runs `kubectl port-forward` (install kubectl "
                              ">= 1.27)") from None
        try:
            while forward.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{local}/model", timeout=5) as reply:
                        return json.loads(reply.read())
                except OSError as exc:
                    error = str(exc)
                    time.sleep(1)
        finally:
            forward.terminate()
            _, stderr = forward.communicate(timeout=10)
        said = (stderr or "").strip().splitlines()
        error = said[-1] if said else error  # kubectl's reason (e.g. the pod is not running) before ours
        if time.monotonic() >= deadline:
            raise DeployError(f"the rollout finished but /model did not answer through service/{service}: "
                              f"{error}")
        time.sleep(1)


@dataclass
class CanaryOutcome:
    promoted: bool
    message: str  # Argo's: the analysis that failed, or that the rollout is fully promoted
    stable: str | None  # the release version the cluster served before (None: a first release)
    event: PromotionEvent  # as recorded in the promotion history
    alias_moved: bool  # the alias went back to `stable` (after an abort)


def served_release(namespace: str, name: str, *, client: object = None) -> str | None:
    """The release version (the alias's version) the cluster serves now: the release annotation `pin` puts on
    the pod template of the Rollout's stable revision, or of a live Deployment; None for a first release."""
    template = cluster.stable_template(namespace, name, client=client)
    if template is None:
        return None
    annotations, labels = template.get("annotations") or {}, template.get("labels") or {}
    return annotations.get(RELEASE_ANNOTATION) or labels.get(LABEL)


def apply_canary(rendered: Rendered, *, alias: str = "production", timeout_s: float = 1800, poll_s: float = 5,
                 client: object = None) -> CanaryOutcome:
    """Apply a canary release and follow it to its end; record the outcome (registry.record_canary).

    1. Read which release the cluster serves (stable), before anything changes.
    2. Server-side apply; the Deployment's new template starts a canary in the Rollout.
    3. Follow the Rollout (cluster.wait_canary) until promoted (Healthy, the new revision stable), aborted (the
       analysis failed, or the canary never got ready) or degraded.
    4. Promoted: `canary-promoted` recorded (a first release: the Deployment checked to be at 0, Argo's pods
       having taken over). Aborted: `canary-aborted` recorded, the alias moved back to the stable release, so it
       never names a version the cluster no longer serves, and the stable pod template put back on the
       Deployment, so the Rollout is Healthy on the stable pods and nothing retries the bad canary. With no
       stable release (a first release: Argo runs it unanalysed, so an abort is rare) the alias is left, the
       event says so and the caller fails loudly. Degraded without an abort (e.g. a spec the controller
       refuses): nothing is recorded, DeployError. A timeout: nothing recorded or moved, DeployError saying how to look.
    """
    rollout = next((d for d in rendered.documents if d["kind"] == "Rollout"), None)
    if rollout is None:
        raise DeployError("no Rollout among the manifests: render them with strategy canary")
    namespace, name = rollout["metadata"].get("namespace", "default"), rollout["metadata"]["name"]
    client = client or cluster.api_client()
    stable = served_release(namespace, name, client=client)
    cluster.apply(rendered.documents, client=client)
    workload = rollout["spec"]["workloadRef"]["name"]
    generation = int((cluster.read_deployment(namespace, workload, client=client) or {}).get("metadata", {})
                     .get("generation", 0))
    state, message = cluster.wait_canary(namespace, name, workload_generation=generation, timeout_s=timeout_s,
                                         poll_s=poll_s, client=client)
    if state == cluster.DEGRADED:
        raise DeployError(f"rollout {namespace}/{name} is degraded: {message}; nothing recorded. Look with "
                          f"`kubectl argo rollouts get rollout {name} -n {namespace}`")
    promoted = state == cluster.PROMOTED
    event, moved = record_canary(rendered.registry_name, alias, canary=rendered.release, stable=stable,
                                 promoted=promoted, message=message)
    if promoted and stable is None:  # the first revision: Argo must have taken the Deployment's pods over
        cluster.wait_scaled_down(namespace, workload, timeout_s=min(timeout_s, 300), poll_s=poll_s, client=client)
    if not promoted and cluster.restore_stable_template(namespace, name, workload, client=client):
        generation = int((cluster.read_deployment(namespace, workload, client=client) or {})
                         .get("metadata", {}).get("generation", 0))
        after, _ = cluster.wait_canary(namespace, name, workload_generation=generation,
                                       timeout_s=min(timeout_s, 300), poll_s=poll_s, client=client)
        if after != cluster.PROMOTED:
            raise DeployError(f"the canary of {namespace}/{name} was aborted ({message}) and the stable template "
                              f"restored, but the Rollout reads {after}: look with `kubectl argo rollouts get "
                              f"rollout {name} -n {namespace}`")
    return CanaryOutcome(promoted, message, stable, event, moved)
