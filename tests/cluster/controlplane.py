"""A real Kubernetes control plane on 127.0.0.1, from upstream's binaries (tests/cluster/build.sh builds them).

etcd, kube-apiserver (RBAC, Pod Security admission, the default admission chain), kube-controller-manager
(Deployment, ReplicaSet, Job, node lifecycle ... each controller with its own service account), kube-scheduler
and kwok, which plays the kubelet of every node: nodes report Ready, bound pods get an address and turn
Running and Ready, Job pods complete. Nothing runs in the pods (no kubelet, no container runtime; docs/stack.md
says why), so each node's pod CIDR is a loopback /24: a test that needs a pod to answer starts the real server
at the address the pod got.

The nodes are labelled as real clusters label them (tests/cluster/nodes.yaml): CPU nodes in two zones, GPU
nodes with GPU feature discovery's labels (the GPU Operator's, and standalone GFD's without gpu.present),
GPU and control-plane nodes tainted.

    python tests/cluster/controlplane.py        # `make cluster`: start it, print the KUBECONFIG line, wait
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
NODES = HERE / "nodes.yaml"
START_TIMEOUT_S = 120


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the thread that started it dies, so a pytest killed by a signal
    (its fixtures' finalizers never run) leaves no API server, etcd or `bentoml serve` behind. SIGTERM, not
    SIGKILL: `bentoml serve` then stops its worker processes, which SIGKILL would orphan (still listening on the
    pod's address, answering the next run's traffic). Linux only; call it only from a thread that lives as long as
    the child should (the main thread, or a fixture's own thread)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def build(*, only_if_built: bool = False) -> Path | None:
    """The folder of binaries, CRDs and kwok stages for the pinned versions (built on first use: minutes).
    With only_if_built: None instead of building."""
    env = {**os.environ, **({"DISTILOPS_CLUSTER_ONLY_IF_BUILT": "1"} if only_if_built else {})}
    result = subprocess.run(["bash", str(HERE / "build.sh")], env=env, stdout=subprocess.PIPE, text=True)
    if only_if_built and result.returncode == 3:
        return None
    result.check_returncode()
    return Path(result.stdout.strip().splitlines()[-1])


def built() -> Path | None:
    """The built folder, or None; DISTILOPS_CLUSTER_BINARIES names one built elsewhere (same layout)."""
    if os.environ.get("DISTILOPS_CLUSTER_BINARIES"):
        return Path(os.environ["DISTILOPS_CLUSTER_BINARIES"])
    return build(only_if_built=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- certificates: one CA signs the API server's serving certificate and each component's client identity ---

def _key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(subject_cn: str, key, *, ca=None, ca_key=None, orgs: tuple[str, ...] = (), server: bool = False,
          is_ca: bool = False) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject if ca else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default.svc"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("10.96.0.1"))]),
            critical=False)
    if not is_ca:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(ca_key or key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pki(folder: Path) -> None:
    """ca, apiserver (serving), service-account key pair, and client certificates for each identity."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_pem = _cert("distilops-test-ca", ca_key, is_ca=True)
    ca = x509.load_pem_x509_certificate(ca_pem)
    (folder / "ca.crt").write_bytes(ca_pem)
    server_key = _key()
    (folder / "apiserver.key").write_bytes(_pem_key(server_key))
    (folder / "apiserver.crt").write_bytes(_cert("kube-apiserver", server_key, ca=ca, ca_key=ca_key, server=True))
    # the kubelet API kwok serves for every node (port-forward): a serving certificate the API server verifies
    kubelet_key = _key()
    (folder / "kubelet.key").write_bytes(_pem_key(kubelet_key))
    (folder / "kubelet.crt").write_bytes(_cert("kwok-kubelet", kubelet_key, ca=ca, ca_key=ca_key, server=True))
    sa_key = _key()
    (folder / "sa.key").write_bytes(_pem_key(sa_key))
    (folder / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    # who each component is: the user names the default RBAC roles bind (system:kube-scheduler, ...)
    for name, cn, orgs in (("admin", "distilops-admin", ("system:masters",)),
                           ("controller-manager", "system:kube-controller-manager", ()),
                           ("scheduler", "system:kube-scheduler", ()),
                           ("kwok", "kwok-controller", ("system:masters",)),
                           ("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",))):
        key = _key()
        (folder / f"{name}.key").write_bytes(_pem_key(key))
        (folder / f"{name}.crt").write_bytes(_cert(cn, key, ca=ca, ca_key=ca_key, orgs=orgs))


def kubeconfig(server: str, pki: Path, user: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "distilops-test",
        "clusters": [{"name": "distilops-test", "cluster": {"server": server,
                                                             "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate": str(pki / f"{user}.crt"),
                                          "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "distilops-test", "context": {"cluster": "distilops-test", "user": user}}],
    }


@dataclass
class ControlPlane:
    """The processes of one control plane and where they keep their state; `start()` returns once nodes are
    Ready and the default service account exists."""

    binaries: Path
    workdir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    server: str = ""

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def bin(self, name: str) -> str:
        return str(self.binaries / "bin" / name)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent)
        self.processes[name] = process
        return process

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}); its log ends:\n{self.log_tail(name)}")

    def wait_for(self, what: str, ready, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            with contextlib.suppress(Exception):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s")
            time.sleep(0.3)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input,
                                capture_output=True, text=True)
        if check and result.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def start(self) -> ControlPlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_pki(self.pki)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        for user in ("admin", "controller-manager", "scheduler", "kwok"):
            (self.workdir / f"{user}.kubeconfig").write_text(yaml.safe_dump(kubeconfig(self.server, self.pki, user)))
        self.spawn("etcd", [self.bin("etcd"), "--data-dir", str(self.workdir / "etcd"), "--name", "test",
                            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                            "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
                            "--unsafe-no-fsync", "--quota-backend-bytes", str(2 << 30), "--log-level", "warn"])
        pki = self.pki
        self.spawn("kube-apiserver", [
            self.bin("kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",  # as on real clusters: Pod Security admission, not this flag, decides
            "--enable-priority-and-fairness=false", "--profiling=false", "--endpoint-reconciler-type=none",
            "--storage-media-type=application/json",
            # to the nodes' kubelet API (kwok's server): verified, as a hardened cluster does
            f"--kubelet-certificate-authority={pki / 'ca.crt'}", "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}", "--v=1"])
        self.wait_for("kube-apiserver", lambda: self.kubectl("get", "--raw", "/readyz").returncode == 0)
        self.spawn("kube-controller-manager", [
            self.bin("kube-controller-manager"), f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
            "--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle-controller",
            "--concurrent-deployment-syncs=5", "--node-monitor-grace-period=60s",
            "--kube-api-qps=200", "--kube-api-burst=400", "--v=1"])
        self.spawn("kube-scheduler", [
            self.bin("kube-scheduler"), f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
            "--leader-elect=false", "--secure-port=0", "--kube-api-qps=200", "--kube-api-burst=400", "--v=1"])
        stages = sorted((self.binaries / "kwok").glob("*.yaml"))
        config = self.workdir / "kwok.yaml"
        config.write_text("---\n".join(p.read_text() for p in stages))
        # kwok also serves the nodes' kubelet API (one server, every node's address and port): `kubectl
        # port-forward` reaches a pod through the API server as on a real cluster, to where the PortForward
        # object named as the pod points (pods.py)
        self.kubectl("apply", "--server-side", "-f", str(HERE / "crds" / "kwok-portforwards.yaml"))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/portforwards.kwok.x-k8s.io")
        kubelet_port = free_port()
        self.spawn("kwok", [
            self.bin("kwok"), f"--kubeconfig={self.workdir / 'kwok.kubeconfig'}", f"--config={config}",
            "--manage-all-nodes=true", "--node-ip=127.0.0.1", "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{kubelet_port}", f"--node-port={kubelet_port}", "--enable-crds=PortForward",
            f"--tls-cert-file={pki / 'kubelet.crt'}", f"--tls-private-key-file={pki / 'kubelet.key'}", "--v=1"])
        nodes = NODES.read_text()
        self.kubectl("apply", "--server-side", "-f", "-", input=nodes)
        names = [doc["metadata"]["name"] for doc in yaml.safe_load_all(nodes) if doc]

        def nodes_ready() -> bool:
            out = self.kubectl("get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name}="
                               "{.status.conditions[?(@.type=='Ready')].status} {end}").stdout.split()
            return sorted(n.split("=")[0] for n in out if n.endswith("=True")) == sorted(names)

        self.wait_for("every node Ready", nodes_ready)
        self.wait_for("the default namespace's service account",
                      lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0)
        return self

    def empty_namespace(self, namespace: str, timeout_s: float = 90) -> None:
        """Delete every workload in `namespace` (Rollouts too where Argo's CRDs are installed) and wait until no
        pod is left: each test module starts from an empty namespace."""
        kinds = "deployments,replicasets,statefulsets,jobs,horizontalpodautoscalers,pods"
        if self.kubectl("get", "crd", "rollouts.argoproj.io", check=False).returncode == 0:
            kinds = "rollouts.argoproj.io,analysisruns.argoproj.io," + kinds
        self.kubectl("delete", kinds, "--all", "-n", namespace, "--grace-period=0", "--force", "--wait=false",
                     check=False)
        self.wait_for(f"no pod left in {namespace}", lambda: not self.kubectl(
            "get", "pods", "-n", namespace, "-o", "name").stdout.strip(), timeout_s=timeout_s)

    # --- add-ons: the controllers the canary path needs, at the versions tests/cluster/*/go.mod pin ---------

    def install_crds(self, project: str) -> None:
        """Apply the CRDs build.sh copied from `project`'s module (argo, prometheus-operator), wait until served."""
        folder = self.binaries / "crds" / project
        self.kubectl("apply", "--server-side", "-f", str(folder))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(folder))

    def start_argo_rollouts(self) -> None:
        """Argo Rollouts' controller (cluster-wide, as its install manifest runs it)."""
        if "argo-rollouts" in self.processes:
            return
        self.install_crds("argo")
        self.spawn("argo-rollouts", [self.bin("rollouts-controller"), f"--kubeconfig={self.kubeconfig}",
                                     "--leader-elect=false", f"--metricsport={free_port()}",
                                     f"--healthzPort={free_port()}", "--loglevel=info"])

    def start_prometheus_operator(self) -> None:
        """prometheus-operator: turns Prometheus, PodMonitor and PrometheusRule objects into Prometheus's
        configuration (a Secret) and rule files (ConfigMaps); monitoring.OperatedPrometheus runs them."""
        if "prometheus-operator" in self.processes:
            return
        self.install_crds("prometheus-operator")
        pki = self.pki
        self.spawn("prometheus-operator", [
            self.bin("prometheus-operator"), f"--apiserver={self.server}", f"--ca-file={pki / 'ca.crt'}",
            f"--cert-file={pki / 'admin.crt'}", f"--key-file={pki / 'admin.key'}",
            f"--web.listen-address=127.0.0.1:{free_port()}", "--log-level=info"])

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()


def main() -> None:
    """`make cluster`: start a control plane, print how to use it, stop it on Ctrl-C."""
    binaries = build()
    workdir = Path(tempfile.mkdtemp(prefix="distilops-cluster-"))
    plane = ControlPlane(binaries, workdir)
    started = time.monotonic()
    try:
        plane.start()
        print(f"control plane up in {time.monotonic() - started:.0f} s (logs in {workdir}); in another shell:\n\n"
              f"  export KUBECONFIG={plane.kubeconfig}\n  kubectl get nodes -L nvidia.com/gpu.product\n\n"
              "Ctrl-C stops it.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit: the finally below stops the processes
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
