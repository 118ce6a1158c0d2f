"""sha256 of the things lineage is made of: bytes and text, files, model folders, settings.

One streaming digest underneath, so a hash computed here always means the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BLOCK = 1 << 20


def _update(digest: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)


def sha256(parts: Iterable[bytes | str] | bytes | str) -> str:
    """Hex sha256 of a string or bytes, or of several concatenated (str as UTF-8)."""
    digest = hashlib.sha256()
    for part in [parts] if isinstance(parts, (bytes, str)) else parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    _update(digest, Path(path))
    return digest.hexdigest()


def folder_sha256(folder: str | Path) -> str:
    """Hex sha256 over a folder's files, in name order: each file's relative path, then its bytes."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        _update(digest, path)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """Hex sha256 of a JSON-able value, key order ignored (settings, fingerprints)."""
    return sha256(json.dumps(value, sort_keys=True, default=str))
