"""Start the real BentoML service (`bentoml serve` on 127.0.0.1, a free port) for tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cluster.controlplane import die_with_parent

from distilops.release.deploy import free_port  # noqa: F401 (the library's, which `deploy` port-forwards to)

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE_PATHS = ("/livez", "/readyz")  # what the Kubernetes probes call (tests/test_k8s.py checks the manifests)


def wait_ready(url: str, timeout: float = 90, *, exited=None, detail=lambda: "") -> None:  # noqa: ANN001
    """Poll `url` until it answers 200. `exited()` may return why waiting is pointless (a dead process);
    `detail()` adds what to show when time runs out (a log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited and (why := exited()):
            raise RuntimeError(why)
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout} s:\n{detail()}")


class Server:
    def __init__(self, args: list[str], env: dict, port: int, log: Path, cwd: Path = SRC,
                 ready_path: str = "/readyz", host: str = "127.0.0.1") -> None:
        self.url = f"http://{host}:{port}"
        self.ready_path = ready_path  # answers 200 once the server can take requests
        self.env = env
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (kept open for the server's life)
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=die_with_parent)

    def wait_ready(self, timeout: float = 90) -> None:
        def exited() -> str | None:
            if self.process.poll() is None:
                return None
            return f"server exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}"

        wait_ready(self.url + self.ready_path, timeout, exited=exited,
                   detail=lambda: self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
        self._log_file.close()


def bentoml_serve(port: int, env: dict, log: Path, host: str = "127.0.0.1", cwd: Path = SRC,
                  wrapper: tuple[str, ...] = ()) -> Server:
    """`bentoml serve` of the service in `cwd` (a src/ folder), started through `wrapper` (argv put before it)."""
    bentoml = str(Path(sys.executable).parent / "bentoml")
    return Server([*wrapper, bentoml, "serve", "distilops.serving.service:Classifier", "--host", host,
                   "--port", str(port)], env, port, log, cwd=cwd, host=host)


def batch_histogram(metrics_text: str) -> tuple[int, float]:
    """(model calls, requests) of the classify API: BentoML's adaptive_batch_size histogram (adaptive dispatch) plus
    the service's distilops_texts_per_call (continuous dispatch; a request of one text each). Summed, not picked:
    servers sharing a BENTOML_HOME share its Prometheus directory, so one /metrics may hold both."""
    calls = requests = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size") and 'method_name="classify"' not in line:
            continue
        for family in ("bentoml_service_adaptive_batch_size", "distilops_texts_per_call"):
            if line.startswith(f"{family}_count"):
                calls += float(line.rsplit(" ", 1)[1])
            if line.startswith(f"{family}_sum"):
                requests += float(line.rsplit(" ", 1)[1])
    return int(calls), requests


def scrape(metrics_text: str) -> dict[str, list]:
    """Prometheus text -> {family name: [(sample name, labels, value), ...]}, with each family's type under
    `type:<name>` (prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics_text):
        found[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
        found[f"type:{family.name}"] = [family.type]
    return found


def sample(scraped: dict[str, list], family: str, name: str | None = None, **labels: str) -> float | None:
    """The value of the one sample of `family` named `name` (default: the family's) with these labels, or None."""
    values = [value for sample_name, sample_labels, value in scraped.get(family, [])
              if sample_name == (name or family) and labels.items() <= sample_labels.items()]
    assert len(values) <= 1, f"{family} {labels}: {len(values)} samples"
    return values[0] if values else None
