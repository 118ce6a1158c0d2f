"""Run a serving image with podman the way Kubernetes runs the classifier Deployment (tests and benchmarks).

Everything comes from the rendered manifest, not from a copy of it: user and group, read-only root
filesystem, dropped capabilities, no privilege escalation, an emptyDir -> a tmpfs at its mount path
(world-writable like the kubelet's emptyDirs), the ConfigMap's environment plus the container's own,
the downward API's CPU limit, the CPU and memory limits, and the container's args.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("podman", "buildah", "debootstrap", "runc")
# This machine's podman: crun fails on its cgroups, and rlimits may be lowered but not raised.
RUNTIME = ["--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def cpus(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("2", "500m", or a bare number) in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory(quantity: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    return quantity[:-2] + units[quantity[-2:]] if quantity[-2:] in units else quantity


def podman_args(documents: list[dict]) -> list[str]:
    """`podman run` options equivalent to the Deployment's pod (its first container)."""
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    pod, own = spec["securityContext"], container["securityContext"]
    args = [*RUNTIME, "--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    if own.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes adds no tmpfs of its own
    args += [arg for cap in own["capabilities"]["drop"] for arg in ("--cap-drop", cap)]
    if own.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        empty_dir = volumes[mount["name"]]["emptyDir"]  # serving mounts nothing else
        size = f",size={memory(empty_dir['sizeLimit'])}" if empty_dir.get("sizeLimit") else ""
        args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777{size}"]
    limits = container["resources"]["limits"]
    env = dict(config)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"].get("resourceFieldRef", {}).get("resource") == "limits.cpu":
            env[item["name"]] = str(math.ceil(cpus(limits["cpu"])))  # the downward API rounds up to the divisor
    args += [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    args += ["--cpus", str(cpus(limits["cpu"])), "--memory", memory(limits["memory"])]
    return args


def container_args(documents: list[dict]) -> list[str]:
    """The Deployment container's `args`: what Kubernetes hands the image's entrypoint (`bentoml serve BENTO`)."""
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    return list(deployment["spec"]["template"]["spec"]["containers"][0].get("args", []))
