"""OCI images of a registered version, built with buildah: `distilops image --device cpu|gpu`.

    registry version --package--> BentoML model --bentoml build/export--> Bento (service + model)
        --buildah (container/Containerfile)--> localhost/distilops-classifier:v<version>-<device>

- The Python packages come from bentofile.yaml (the CPU set; the GPU image swaps `onnxruntime` for
  `onnxruntime-gpu[cuda,cudnn]`, whose extras pin the CUDA and cuDNN libraries it was built against).
  They are downloaded on the host (`pip download`, so pip's own index settings apply) and installed
  in the image from those files only: the build needs no network inside the container.
- The base is Debian's python3 from `debootstrap` (only Debian packages, no image registry), made
  once and kept as localhost/distilops-base:bookworm. With Docker Hub access, `--base
  docker.io/library/python:3.11-slim` (or any image with python3 and venv) works the same.
- The image tag, ID and digest are recorded on the registry version (`image.*` tags), so
  `distilops deploy` pins what was built for the version production names.
- The release's teacher rides along as the shadow model unless `shadow=False` (package.py): the image
  grows by the teacher's size; the pod runs it only when DISTILOPS_SHADOW_RATE > 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from distilops import paths
from distilops.commands import run_command
from distilops.errors import ImageError
from distilops.release.package import Packaged, package
from distilops.release.registry import client

log = logging.getLogger(__name__)
BASE_IMAGE = "localhost/distilops-base:bookworm"
CONTAINERFILE = Path("container/Containerfile")
BENTOFILE = Path("bentofile.yaml")
GPU_RUNTIME = "onnxruntime-gpu[cuda,cudnn]"
IMAGE_NAME = "distilops-classifier"  # bentofile.yaml's name, and the image k8s/base deploys
LOCAL_REPOSITORY = f"localhost/{IMAGE_NAME}"  # where `distilops image` builds, before any push
# Tags on the registry version served: what was built (ref, id, local digest), where it was pushed and the
# digest that registry reported. `distilops deploy` reads them.
IMAGE_REF, IMAGE_ID = "image.ref", "image.id"
PUSHED, PUSHED_DIGEST, PUSHED_ID = "image.pushed", "image.pushed_digest", "image.pushed_id"


def image_tag(version: str, device: str) -> str:
    """An image's tag: the registry version it serves and its device, `v7-cpu`."""
    return f"v{version}-{device}"


def in_registry(registry: str, tag: str) -> str:
    """The image `tag` in a registry (HOST[:PORT]/PATH): where a push goes and what pods pull."""
    return f"{registry.rstrip('/')}/{IMAGE_NAME}:{tag}"


def registry_of(ref: str) -> str:
    """The registry (HOST[:PORT]/PATH) a reference made by `in_registry` points into."""
    return ref.rsplit(":", 1)[0].removesuffix(f"/{IMAGE_NAME}")


@dataclass
class BuiltImage:
    ref: str  # localhost/distilops-classifier:v7-cpu
    image_id: str
    digest: str  # of the local manifest; a push may re-compress layers: `deploy` uses the pushed digest
    size_mb: float
    device: str
    registry_name: str
    registry_version: str
    release_version: str
    bento: str
    seconds: dict[str, float]

    def as_dict(self) -> dict:
        return asdict(self)


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a build tool; a failure is an ImageError with the tool's last lines, not a traceback."""
    return run_command(cmd, what=f"{what} failed", error=ImageError,
                       missing=f"{what} needs Debian's podman, buildah, debootstrap and runc (`make test-tools` "
                               "installs them as root; docs/stack.md)", **kwargs)


def image_exists(ref: str) -> bool:
    return shutil.which("podman") is not None and subprocess.run(
        ["podman", "image", "exists", ref], capture_output=True).returncode == 0


def build_base(ref: str = BASE_IMAGE, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian") -> str:
    """A minimal Debian with python3 and venv, from Debian's packages alone (debootstrap), as a podman image."""
    with tempfile.TemporaryDirectory(prefix="distilops-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log.info("building the base image %s with debootstrap (about a minute, once)", ref)
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", suite,
             str(rootfs), mirror], "debootstrap")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/locale", "usr/share/info"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "--change", "CMD [\"/bin/bash\"]", "-", ref], "podman import", stdin=tar.stdout)
        tar.wait()
    return ref


def python_packages(device: str, bentofile: Path = BENTOFILE) -> list[str]:
    """The service's packages for `device`: bentofile.yaml's list, with the GPU build of ONNX Runtime on GPU."""
    packages = yaml.safe_load(bentofile.read_text())["python"]["packages"]
    if device == "gpu":
        packages = [GPU_RUNTIME + p.removeprefix("onnxruntime") if p.split("=")[0] == "onnxruntime" else p
                    for p in packages]
    return packages


def build_bento(packaged: Packaged, out: Path, bentofile: Path = BENTOFILE) -> str:
    """`bentoml build` the service around the packaged model (with the device's package list), export it
    with the model inside and unpack it into `out`. Returns the Bento tag."""
    spec = yaml.safe_load(bentofile.read_text())
    spec["python"]["packages"] = python_packages(packaged.device, bentofile)
    spec["labels"] = {**spec.get("labels", {}), "device": packaged.device,
                      "registry_version": packaged.registry_version,
                      **({"shadow_version": packaged.shadow_version} if packaged.shadow_version else {})}
    # The service finds its model by this tag when the Bento is served (from its own model store).
    spec["envs"] = [e for e in spec.get("envs", []) if e["name"] != "DISTILOPS_BENTO_MODEL"] + [
        {"name": "DISTILOPS_BENTO_MODEL", "value": packaged.tag}]
    env = {**os.environ, "DISTILOPS_BENTO_MODEL": packaged.tag, "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = str(Path(sys.executable).parent / "bentoml")
    with tempfile.TemporaryDirectory(prefix="distilops-bento-") as tmp:
        device_bentofile = Path(tmp) / "bentofile.yaml"
        device_bentofile.write_text(yaml.safe_dump(spec))
        built = run([bentoml, "build", "-f", str(device_bentofile), "-o", "tag", str(Path("src").resolve())],
                    "bentoml build", env=env)
        tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
        archive = Path(tmp) / "service.bento"
        run([bentoml, "export", tag, str(archive)], "bentoml export", env=env)
        if out.exists():
            shutil.rmtree(out)
        with tarfile.open(archive) as bento:
            # The "data" filter (no absolute paths, links out of `out`, devices) exists from Python 3.11.4 and
            # 3.10.12 on; older interpreters (Debian 12's python3 is 3.11.2) extract our own export unfiltered.
            bento.extractall(out, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        readable_by_all(out)
    return tag


def readable_by_all(root: Path) -> None:
    """The image runs as uid 1034, not as the builder: every file readable, every folder traversable. (The export
    keeps BentoML's 0700 store folders; only the data filter of newer Pythons happens to reset them.)"""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        path.chmod(0o755 if path.is_dir() else (mode | 0o444) & ~0o022)


def download_wheels(packages: list[str], dest: Path) -> None:
    """The packages and everything they need as wheel files in `dest`, with requirements.txt listing them.

    pip skips files it already has, so `dest` doubles as a cache between builds."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "requirements.txt").write_text("\n".join(packages) + "\n")
    run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
         "-d", str(dest), "-r", str(dest / "requirements.txt")], "pip download")


def inspect_image(ref: str) -> dict:
    return json.loads(run(["podman", "image", "inspect", ref], "podman image inspect").stdout)[0]


def record(packaged: Packaged, built: BuiltImage) -> None:
    """Tag the served registry version with its image (what `distilops deploy` pins)."""
    c = client()
    tags = {IMAGE_REF: built.ref, IMAGE_ID: built.image_id, "image.digest": built.digest,
            "image.size_mb": f"{built.size_mb:.1f}",
            "image.built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in tags.items():
        c.set_model_version_tag(packaged.registry_name, packaged.registry_version, key, value)


def build_image(model_name: str, *, device: str = "cpu", alias: str = "production", version: str | None = None,
                base: str | None = None, repository: str = LOCAL_REPOSITORY,
                context_root: Path | None = None, shadow: bool = True) -> BuiltImage:
    """Package the version serving `device` in the alias's (or the given version's) release (with its teacher
    as the shadow model, if `shadow` and the release has one), build its image with buildah, record the image
    on the version; returns what was built."""
    missing = [str(p) for p in (CONTAINERFILE, BENTOFILE, Path("src/distilops/serving/service.py")) if not p.exists()]
    if missing:
        raise ImageError(f"{', '.join(missing)} not found: run `distilops image` from the repository root")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    packaged = package(model_name, alias=alias, version=version, device=device, shadow=shadow)
    if packaged.format != "onnx":
        raise ImageError(f"version {packaged.registry_version} is a {packaged.format} model: the serving images "
                         "run ONNX only (promote a version registered by the register stage)")
    context = (context_root or paths.cache_dir() / "images") / device
    bento_tag = build_bento(packaged, context / "bento")
    seconds["bento"] = time.perf_counter() - started

    mark = time.perf_counter()
    download_wheels(python_packages(device), context / "wheels")
    seconds["wheels"] = time.perf_counter() - mark
    mark = time.perf_counter()
    if base is None:
        base = BASE_IMAGE if image_exists(BASE_IMAGE) else build_base(BASE_IMAGE)
    seconds["base"] = time.perf_counter() - mark

    mark = time.perf_counter()
    shutil.copy2(CONTAINERFILE, context / "Containerfile")
    ref = f"{repository}:{image_tag(packaged.registry_version, device)}"
    labels = {"ai.distilops.registry-name": model_name, "ai.distilops.registry-version": packaged.registry_version,
              "ai.distilops.release-version": packaged.release_version, "ai.distilops.device": device,
              "ai.distilops.variant": packaged.variant, "ai.distilops.bento": bento_tag,
              **({"ai.distilops.shadow-version": packaged.shadow_version} if packaged.shadow_version else {})}
    run(["buildah", "bud", "--isolation", "chroot", "--layers=false", "-f", str(context / "Containerfile"),
         "--build-arg", f"BASE={base}", "--build-arg", f"MODEL_TAG={packaged.tag}",
         *[arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")],
         "-t", ref, str(context)], "buildah bud")
    seconds["build"] = time.perf_counter() - mark
    info = inspect_image(ref)
    built = BuiltImage(ref=ref, image_id=info["Id"], digest=info.get("Digest", ""), size_mb=info["Size"] / 1e6,
                       device=device, registry_name=model_name, registry_version=packaged.registry_version,
                       release_version=packaged.release_version, bento=bento_tag,
                       seconds={k: round(v, 1) for k, v in seconds.items()})
    record(packaged, built)
    log.info("built %s (%.0f MB) for %s v%s (%s)", ref, built.size_mb, model_name, packaged.registry_version,
             packaged.variant)
    return built


def push(model_name: str, version: str, registry: str, *, tls_verify: bool = True) -> str:
    """Push a version's recorded image to `registry` (HOST[:PORT]/PATH) under the same tag; record the
    pushed reference and its digest (a push may re-compress layers, so the local digest no longer applies)."""
    c = client()
    tags = c.get_model_version(model_name, version).tags
    if not tags.get(IMAGE_REF):
        raise ImageError(f"version {version} has no image: `distilops image --version {version}` first")
    target = in_registry(registry, tags[IMAGE_REF].rsplit(":", 1)[1])
    with tempfile.TemporaryDirectory() as tmp:
        digest_file = Path(tmp) / "digest"
        run(["podman", "push", f"--tls-verify={str(tls_verify).lower()}", "--digestfile", str(digest_file),
             tags[IMAGE_REF], target], "podman push")
        digest = digest_file.read_text().strip()
    c.set_model_version_tag(model_name, version, PUSHED, target)
    c.set_model_version_tag(model_name, version, PUSHED_DIGEST, digest)
    c.set_model_version_tag(model_name, version, PUSHED_ID, tags.get(IMAGE_ID, ""))  # which build was pushed
    log.info("pushed %s (%s)", target, digest)
    return f"{target}@{digest}"
