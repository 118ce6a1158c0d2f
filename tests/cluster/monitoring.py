"""Prometheus as prometheus-operator configures it, run beside the test control plane.

The operator turns a Prometheus object and the PodMonitors and PrometheusRules it selects into a configuration
(the Secret prometheus-<name>, prometheus.yaml.gz) and rule files (ConfigMaps prometheus-<name>-rulefiles-N),
and makes a StatefulSet whose pods would run Prometheus with them. Here kwok plays those pods, so this class
does what their containers do: reads the Secret and ConfigMaps, writes them where the configuration points,
runs Prometheus, and reloads it when the operator changes them (the config-reloader sidecar's job).

The Prometheus is upstream's, built by build.sh at the version the operator pins as its default (Debian's
2.42 is built without Kubernetes service discovery, which every PodMonitor's configuration uses).

Two rewrites, both of what a pod has and this process lacks: the pod's in-cluster credentials become the
control plane's address and client certificate (kubernetes_sd_configs), and the rule files' mount path a local
folder. Everything else (relabelling, target labels, honor_labels, intervals) is the operator's, unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import shutil
import threading
import time

import httpx
import yaml
from kubernetes import client as k8s
from serving import Server, free_port

PROMETHEUS_VERSION = "v3.13.1"  # github.com/prometheus/prometheus v0.313.1 (tests/cluster/controlplane/go.mod)


class OperatedPrometheus:
    def __init__(self, plane, api, namespace: str = "monitoring", name: str = "distilops", *,  # noqa: ANN001
                 interval: str = "5s") -> None:  # noqa: ANN001
        self.plane, self.api, self.namespace, self.name = plane, api, namespace, name
        self.root = plane.workdir / f"prometheus-{name}"
        self.rules = self.root / "rules"
        self.interval = interval
        self.config_text, self.rule_texts = "", {}
        self.stopping = threading.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Server | None = None

    def create(self) -> None:
        """The Prometheus object, in a namespace of its own as clusters run it: every PodMonitor and
        PrometheusRule of every namespace."""
        with contextlib.suppress(k8s.ApiException):  # there already (an earlier start)
            k8s.CoreV1Api(self.api).create_namespace({"metadata": {"name": self.namespace}})
        body = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"version": PROMETHEUS_VERSION, "replicas": 1, "scrapeInterval": self.interval,
                         "evaluationInterval": self.interval, "podMonitorSelector": {},
                         "podMonitorNamespaceSelector": {}, "ruleSelector": {}, "ruleNamespaceSelector": {}}}
        k8s.CustomObjectsApi(self.api).create_namespaced_custom_object(
            "monitoring.coreos.com", "v1", self.namespace, "prometheuses", body)

    def operator_output(self) -> tuple[str, dict[str, str]] | None:
        """What the operator wrote: the configuration, rewritten for a process outside the cluster, and the rule
        files ({"<ConfigMap>/<key>": text}); None until the configuration exists."""
        core = k8s.CoreV1Api(self.api)
        try:
            secret = core.read_namespaced_secret(f"prometheus-{self.name}", self.namespace)
        except k8s.ApiException:
            return None
        data = (secret.data or {}).get("prometheus.yaml.gz")
        if not data:
            return None
        # the config-reloader sidecar expands $(VAR) from its environment: the first (only) shard, pod 0
        text = gzip.decompress(base64.b64decode(data)).decode()
        text = text.replace("$(SHARD)", "0").replace("$(POD_NAME)", f"prometheus-{self.name}-0")
        config = yaml.safe_load(text)
        pki = self.plane.pki
        for job in config.get("scrape_configs") or []:
            for sd in job.get("kubernetes_sd_configs") or []:
                sd["api_server"] = self.plane.server
                sd["tls_config"] = {"ca_file": str(pki / "ca.crt"), "cert_file": str(pki / "admin.crt"),
                                    "key_file": str(pki / "admin.key")}
        maps = core.list_namespaced_config_map(self.namespace, label_selector=f"prometheus-name={self.name}").items
        rules = {f"{m.metadata.name}/{key}": text for m in maps for key, text in (m.data or {}).items()}
        config["rule_files"] = [str(self.rules / name / "*.yaml") for name in sorted({m.metadata.name for m in maps})]
        return yaml.safe_dump(config, sort_keys=False), rules

    def write(self, config_text: str, rules: dict[str, str]) -> None:
        """The rule files (swapped in whole: Prometheus never reads half a set), then the configuration."""
        fresh = self.root / "rules.new"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir()
        for name, text in rules.items():
            (fresh / name).parent.mkdir(exist_ok=True)
            (fresh / name).write_text(text)
        shutil.rmtree(self.rules, ignore_errors=True)
        fresh.rename(self.rules)
        (self.root / "prometheus.yaml").write_text(config_text)
        self.config_text, self.rule_texts = config_text, rules

    def start(self) -> OperatedPrometheus:
        self.root.mkdir(parents=True, exist_ok=True)
        self.create()
        deadline = time.monotonic() + 60
        while (output := self.operator_output()) is None:
            self.plane.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus-operator wrote no configuration in 60 s:\n"
                                   + self.plane.log_tail("prometheus-operator"))
            time.sleep(0.5)
        self.write(*output)
        self.server = Server([self.plane.bin("prometheus"), f"--config.file={self.root / 'prometheus.yaml'}",
                              f"--storage.tsdb.path={self.root / 'data'}",
                              f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
                             env={}, port=self.port, log=self.root / "prometheus.log", cwd=self.root,
                             ready_path="/-/ready")
        self.server.wait_ready(60)
        threading.Thread(target=self.follow, daemon=True).start()
        return self

    def follow(self) -> None:
        """Reload when the operator changes the configuration or the rules (new PodMonitor, PrometheusRule): the
        config-reloader sidecar's job."""
        while not self.stopping.wait(1.0):
            try:
                output = self.operator_output()
                if output is not None and output != (self.config_text, self.rule_texts):
                    self.write(*output)
                    httpx.post(f"{self.url}/-/reload", timeout=10)
            except Exception:  # noqa: BLE001 (a transient API error: the next round tries again)
                continue

    def config(self) -> dict:
        return yaml.safe_load(self.config_text)

    def query(self, expr: str) -> list[dict]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if reply.get("status") != "success":
            raise RuntimeError(f"query failed: {reply.get('error')}\n{expr}")
        return reply["data"]["result"]

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.stop()
