"""The classifier's containers, for pods kwok plays: a real `bentoml serve` at each Running pod's address.

kwok gives a bound pod an address in its node's loopback pod CIDR and marks it Running and Ready; nothing runs
there. PodServers watches the pods and starts, for each, the real service on that address, port 3000 (the
container port the PodMonitor scrapes), serving the Bento model of the pod's registry version (the label
`distilops deploy` pins); when a pod goes, its server is stopped. A version mapped to None gets no server: a
pod whose metrics nobody can scrape. Load goes to the Service's endpoints, as kube-proxy spreads it. Each served
pod also gets kwok's PortForward object (named as the pod), so `kubectl port-forward` to the pod or its
Service goes through the API server and kwok's kubelet API to that server, as `distilops deploy --apply` checks
/model.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from kubernetes import client as k8s
from serving import Server, bentoml_serve

VERSION_LABEL = "distilops.ai/registry-version"
KWOK_GROUP, KWOK_VERSION = "kwok.x-k8s.io", "v1alpha1"
FAULTS = Path(__file__).resolve().parents[1] / "faults"  # sitecustomize.py: ONNX Runtime calls that fail


@dataclass
class PodModel:
    """What a version's pods serve: a Bento model tag in `store` (a BENTOML_HOME), and extra environment."""

    tag: str
    store: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def failing(cls, tag: str, store: Path) -> PodModel:
        """Every model call raises (a broken build): /classify answers 5xx."""
        return cls(tag, store, {"PYTHONPATH": str(FAULTS), "DISTILOPS_TEST_FAIL_AFTER_CALLS": "0"})


def listeners(port: int) -> list[str]:
    """Loopback addresses other than 127.0.0.1 with a TCP listener on `port` (Linux: /proc/net/tcp)."""
    found = []
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, hex_port = local.split(":")
            ip = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))  # little-endian
            if state == "0A" and int(hex_port, 16) == port and ip.startswith("127.") and ip != "127.0.0.1":
                found.append(ip)
    return found


class PodServers:
    def __init__(self, api, namespace: str, models: dict[str, PodModel | None], root: Path,  # noqa: ANN001
                 selector: str = "app.kubernetes.io/name=distilops-classifier", env: dict | None = None) -> None:
        self.core = k8s.CoreV1Api(api)
        self.namespace, self.models, self.root, self.selector = namespace, models, root, selector
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
        self.servers: dict[str, Server] = {}  # pod uid -> its server
        self.names: dict[str, str] = {}  # pod uid -> pod name (its PortForward's)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.follow, daemon=True)

    def start(self) -> PodServers:
        if taken := listeners(3000):
            # a pod's server could not bind, and the load and Prometheus would reach the stranger instead: a canary
            # then "fails" on another model's answers
            raise RuntimeError(f"something already listens on port 3000 at {', '.join(taken)}, where pods' servers "
                               "go (left by a killed test run?): stop it first, e.g. pkill -f 'bentoml serve'")
        self.root.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def follow(self) -> None:
        while not self.stopping.wait(0.5):
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
            except k8s.ApiException:
                continue
            live = {p.metadata.uid: p for p in pods if p.status.phase == "Running" and p.status.pod_ip
                    and not p.metadata.deletion_timestamp}
            for uid in set(self.servers) - set(live):
                server = self.servers.pop(uid)
                server.stop()
                self.forward(self.names.pop(uid), None)
            for uid, pod in live.items():
                if uid not in self.servers and (model := self.models.get(pod.metadata.labels.get(VERSION_LABEL))):
                    self.servers[uid] = self.serve(pod, model)
                    self.names[uid] = pod.metadata.name
                    self.forward(pod.metadata.name, pod.status.pod_ip)

    def forward(self, pod: str, address: str | None) -> None:
        """kwok's PortForward for `pod`: its port 3000 to the server at `address` (None: deleted)."""
        objects = k8s.CustomObjectsApi(self.core.api_client)
        try:
            if address is None:
                objects.delete_namespaced_custom_object(KWOK_GROUP, KWOK_VERSION, self.namespace, "portforwards", pod)
            else:
                objects.create_namespaced_custom_object(KWOK_GROUP, KWOK_VERSION, self.namespace, "portforwards", {
                    "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward",
                    "metadata": {"name": pod, "namespace": self.namespace},
                    "spec": {"forwards": [{"ports": [3000], "target": {"address": address, "port": 3000}}]}})
        except k8s.ApiException as exc:
            if exc.status not in (404, 409):  # gone already / made before (a pod re-listed)
                raise

    def serve(self, pod, model: PodModel) -> Server:  # noqa: ANN001
        # One BENTOML_HOME per server, as each pod has its own: BentoML keeps its Prometheus files there
        home = self.root / pod.metadata.name
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(model.store / "models", home / "models")
        env = {**self.env, **model.env, "DISTILOPS_BENTO_MODEL": model.tag, "BENTOML_HOME": str(home)}
        return bentoml_serve(3000, env, self.root / f"{pod.metadata.name}.log", host=pod.status.pod_ip)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


class ServiceLoad:
    """A bounded load on a Service, spread over its ready pods as kube-proxy spreads it over the Service's
    endpoints (those pods): `per_second` requests of 8 texts drawn from `texts`. (The EndpointSlice controller
    refuses the pods' loopback addresses, so the Service's selector is read and its pods listed here.)"""

    def __init__(self, api, namespace: str, service: str, texts: list[str], per_second: float = 30) -> None:  # noqa: ANN001
        self.core = k8s.CoreV1Api(api)
        self.namespace, self.service, self.texts, self.pause = namespace, service, texts, 1 / per_second
        self.sent: dict[str, int] = {}
        self.answers: dict[int, int] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def endpoints(self) -> list[str]:
        try:
            selector = self.core.read_namespaced_service(self.service, self.namespace).spec.selector
        except k8s.ApiException:  # not applied yet
            return []
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=",".join(
            f"{k}={v}" for k, v in selector.items())).items
        return [p.status.pod_ip for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp and any(
            c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]

    def run(self) -> None:
        rng = np.random.default_rng(0)
        endpoints, refreshed = [], 0.0
        with httpx.Client(timeout=30) as client:
            while not self.stopping.is_set():
                if time.monotonic() - refreshed > 1:
                    endpoints, refreshed = self.endpoints(), time.monotonic()
                if endpoints:
                    address = str(rng.choice(endpoints))
                    texts = [str(t) for t in rng.choice(self.texts, size=8)]
                    try:
                        code = client.post(f"http://{address}:3000/classify", json={"texts": texts}).status_code
                    except httpx.HTTPError:
                        code = 0  # not listening (yet, or ever: a pod without a server)
                    self.sent[address] = self.sent.get(address, 0) + 1
                    self.answers[code] = self.answers.get(code, 0) + 1
                time.sleep(self.pause)

    def __enter__(self) -> ServiceLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
