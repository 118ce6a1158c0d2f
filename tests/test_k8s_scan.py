"""Kubernetes manifests scanned with checkov's kubernetes checks, offline: every kustomization rendered as
tests/test_k8s.py renders it, and every failed check either fixed or skipped, with why, in
k8s/checkov-skips.yaml. checkov lives in a venv of its own (`make checkov`): its pins clash with the project's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from test_k8s import KUSTOMIZATIONS, render

ROOT = Path(__file__).resolve().parents[1]
CHECKOV = ROOT / ".venv-tools" / "checkov" / "bin" / "checkov"
SKIPS = ROOT / "k8s" / "checkov-skips.yaml"
# Offline: --skip-download and BC_SKIP_MAPPING keep it from fetching policy metadata from the Prisma Cloud API,
# CKV_SKIP_PACKAGE_UPDATE_CHECK from asking PyPI for a newer checkov. The caller's own settings (CKV_*, BC_*
# variables, a .checkov.yaml in the working or home folder) are left out.
OFFLINE = {"CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE"}

Finding = tuple[str, str, str, str]  # (kustomization, Kind/name, check id, check name)


def scan(rendered: dict[str, list[dict]], workdir: Path) -> tuple[list[Finding], dict]:
    """checkov's kubernetes checks on rendered kustomizations (one file each): the failed checks, and its report."""
    assert CHECKOV.exists(), f"no {CHECKOV.relative_to(ROOT)}: `make checkov` installs checkov (`make test` does)"
    manifests = workdir / "manifests"
    manifests.mkdir()
    files = {kustomization.replace("/", "-") + ".yaml": kustomization for kustomization in rendered}
    for name, kustomization in files.items():
        (manifests / name).write_text(yaml.safe_dump_all(rendered[kustomization], sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKV_", "BC_", "PRISMA_", "CHECKOV_"))}
    result = subprocess.run([str(CHECKOV), "--directory", str(manifests), "--framework", "kubernetes",
                             "--skip-download", "--output", "json", "--soft-fail"],
                            capture_output=True, text=True, cwd=workdir, env=env | OFFLINE | {"HOME": str(workdir)})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout)  # one report per framework; a list when there are several
    (report,) = [r for r in reports if r.get("check_type") == "kubernetes"] if isinstance(reports, list) else [reports]
    assert report.get("check_type") == "kubernetes", f"checkov found nothing to scan: {report}"
    assert not report["results"]["parsing_errors"], report["results"]["parsing_errors"]
    found = []
    for check in report["results"]["failed_checks"]:
        # Kind.namespace.name (a Pod checkov derives from a template adds its labels; these names hold no dots)
        kind, _, name = check["resource"].split(".")[:3]
        found.append((files[Path(check["file_path"]).name], f"{kind}/{name}", check["check_id"], check["check_name"]))
    return sorted(set(found)), report


def load_skips() -> dict[str, dict]:
    skips = yaml.safe_load(SKIPS.read_text())
    for check_id, skip in skips.items():
        well_formed = isinstance(skip, dict) and set(skip) <= {"reason", "resources"}
        assert well_formed and str(skip.get("reason", "")).strip(), f"{SKIPS.name}: {check_id} needs a reason"
    return skips


def skipped(finding: Finding, skips: dict[str, dict]) -> bool:
    skip = skips.get(finding[2])
    return skip is not None and ("resources" not in skip or finding[1] in skip["resources"])


def listing(findings: list[Finding]) -> str:
    return "\n".join("  " + " | ".join(finding) for finding in findings)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {k: render(k) for k in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def scanned(rendered, tmp_path_factory) -> tuple[list[Finding], dict]:
    return scan(rendered, tmp_path_factory.mktemp("checkov"))


@pytest.mark.slow  # checkov takes about 5 s to start and scan
def test_every_failed_check_is_fixed_or_skipped_with_a_reason(rendered, scanned):
    found, report = scanned
    assert report["summary"]["resource_count"] >= sum(map(len, rendered.values()))  # each object, and the pods
    assert report["summary"]["passed"] > 0
    unskipped = [finding for finding in found if not skipped(finding, load_skips())]
    assert not unskipped, ("checkov: fix these, or skip them with why in k8s/checkov-skips.yaml "
                           f"(kustomization | resource | check | name):\n{listing(unskipped)}")
    # Skips live in one reviewed file: none in the manifests (checkov.io/skip annotations)
    assert not report["results"]["skipped_checks"], [c["check_id"] for c in report["results"]["skipped_checks"]]


@pytest.mark.slow
def test_every_skip_still_matches_a_failure(scanned):
    found, _ = scanned
    stale = []
    for check_id, skip in load_skips().items():
        resources = skip.get("resources") or [None]
        stale += [" ".join(filter(None, (check_id, resource))) for resource in resources
                  if not any(f[2] == check_id and resource in (None, f[1]) for f in found)]
    assert not stale, f"fixed: remove from k8s/checkov-skips.yaml: {stale}"


@pytest.mark.slow
def test_the_scan_fails_a_privileged_container(tmp_path):
    """The same scan and skips, on the CPU overlay with its container made privileged: that check fails."""
    docs = render("overlays/cpu")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    found, _ = scan({"overlays/cpu": docs}, tmp_path)
    assert [f for f in found if not skipped(f, load_skips())] == [
        ("overlays/cpu", "Deployment/distilops-classifier", "CKV_K8S_16", "Container should not be privileged")]
