"""What each serving image's Python packages weigh installed: the single image of before (torch's CUDA
build, transformers, onnxruntime-gpu, mlflow-skinny: the old bentofile.yaml) against today's CPU and GPU
images (bentofile.yaml, and its GPU swap in distilops.release.image), plus the sizes podman reports for the
images built here.

    python benchmarks/image_sizes.py [--images localhost/distilops-classifier:v7-cpu ...]

Each package set is resolved by pip as a fresh Linux x86-64 container would (`pip install --dry-run
--isolated --report`: PyPI only, not this machine's local CPU wheel of torch). The installed size of a
wheel is the sum of its files' uncompressed sizes, read from the zip's central directory with HTTP range
requests: no multi-GB download. Bytecode compiled at install time is not counted (a few % more).

The tests measure tiny package sets from a local wheel folder (--sets, --find-links: pip resolves there, offline,
and a local wheel is read from disk); the images part runs beside the image build test (tests/test_container.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from distilops.release.image import python_packages  # noqa: E402

BEFORE = ["bentoml>=1.4.39,<1.5", "opentelemetry-api==1.45.1", "opentelemetry-sdk==1.45.1", "torch==2.13.0",
          "transformers==5.23.*", "onnxruntime-gpu==1.31.*", "pandas>=2.1", "mlflow-skinny>=3.0,<4"]


class RemoteFile:
    """A read-only, seekable view of a URL, fetched in ranges (enough for zipfile to list a wheel)."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as reply:
            self.size = int(reply.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            data = reply.read()
        self.pos += len(data)
        return data


def resolve(requirements: list[str], find_links: Path | None = None) -> list[dict]:
    """pip's install report for `requirements`: from PyPI, or only from the wheels in `find_links`."""
    index = ["--no-index", "--find-links", str(find_links)] if find_links else []
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        # This machine is what the images run: Linux x86-64, CPython 3.11 (the resolution is for it).
        subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
                        "--only-binary=:all:", "-q", *index, "--report", str(report), *requirements], check=True)
        return json.loads(report.read_text())["install"]


def installed_size(url: str) -> tuple[int, int]:
    """(uncompressed bytes, wheel bytes) of the wheel at `url` (a local file:// wheel is read from disk)."""
    if url.startswith("file://"):
        path = Path(urllib.request.url2pathname(url.removeprefix("file://")))
        with zipfile.ZipFile(path) as wheel:
            return sum(info.file_size for info in wheel.infolist()), os.path.getsize(path)
    remote = RemoteFile(url)
    with zipfile.ZipFile(remote) as wheel:
        return sum(info.file_size for info in wheel.infolist()), remote.size


def measure(name: str, requirements: list[str], find_links: Path | None = None) -> dict:
    packages = []
    for item in resolve(requirements, find_links):
        installed, download = installed_size(item["download_info"]["url"])
        packages.append({"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                         "installed_mb": installed / 1e6, "wheel_mb": download / 1e6})
        print(f"{name:10s} {packages[-1]['name']:32s} {packages[-1]['installed_mb']:9.1f} MB", flush=True)
    packages.sort(key=lambda p: -p["installed_mb"])
    return {"requirements": requirements, "packages": len(packages),
            "installed_mb": round(sum(p["installed_mb"] for p in packages), 1),
            "download_mb": round(sum(p["wheel_mb"] for p in packages), 1),
            "torch_or_cuda_mb": round(sum(p["installed_mb"] for p in packages
                                          if p["name"].lower().startswith(("torch", "nvidia", "triton", "cuda"))), 1),
            "largest": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in p.items()} for p in packages[:8]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="*", default=[], help="built images to report podman's size of")
    parser.add_argument("--sets", type=json.loads, default=None,
                        help='JSON {"before (one image)": [requirement, ...], "cpu": [...], "gpu": [...]} '
                             "(default: the old single image's packages, and bentofile.yaml's for each device)")
    parser.add_argument("--find-links", type=Path, default=None, help="resolve only from this wheel folder")
    parser.add_argument("--out", default="benchmarks/results/image_sizes.json")
    args = parser.parse_args()
    sets = args.sets or {"before (one image)": BEFORE, "cpu": python_packages("cpu", ROOT / "bentofile.yaml"),
                         "gpu": python_packages("gpu", ROOT / "bentofile.yaml")}
    result = {"method": __doc__.split("\n\n")[2].replace("\n", " "),
              "python_packages": {name: measure(name, reqs, args.find_links) for name, reqs in sets.items()},
              "images": {}}
    for ref in args.images:
        info = json.loads(subprocess.run(["podman", "image", "inspect", ref], capture_output=True, text=True,
                                         check=True).stdout)[0]
        result["images"][ref] = {"size_mb": round(info["Size"] / 1e6, 1), "digest": info.get("Digest")}
    before = result["python_packages"]["before (one image)"]["installed_mb"]
    result["ratios"] = {f"{name} / before": round(result["python_packages"][name]["installed_mb"] / before, 3)
                        for name in ("cpu", "gpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {n: v["installed_mb"] for n, v in result["python_packages"].items()} if k == "python_packages"
                      else v for k, v in result.items() if k != "method"}, indent=2))


if __name__ == "__main__":
    main()
