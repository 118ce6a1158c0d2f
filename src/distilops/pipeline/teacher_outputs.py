"""Teacher soft targets, computed once per (teacher, data, max_length) and cached on disk.

Layout of the cache folder (a DVC output):
  meta.json                        what it was made from (`fingerprint`), rows per split, hidden size
  transfer_texts.txt               (optional) the unlabelled transfer texts, one per line ("transfer" split)
  {split}_logits.npy               float32 [rows, classes]
  {split}_hidden.npy / _offsets.npy  (optional) float16 last hidden states of every real token,
                                   concatenated; example i is rows offsets[i]:offsets[i+1]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distilops.errors import StaleCacheError
from distilops.hashing import folder_sha256, sha256
from distilops.pipeline.batching import Examples, predict_logits
from distilops.pipeline.distributed import SINGLE, World, gather_objects
from distilops.tracking import data_hash

TEACHER_SPLITS = ("train", "validation")  # the labelled splits whose teacher outputs are cached
TRANSFER, TRANSFER_FILE = "transfer", "transfer_texts.txt"  # unlabelled texts: soft targets only


def fingerprint(teacher_dir: Path, data_report: Path, max_length: int) -> dict:
    """What cached teacher outputs are made from: the teacher folder's hash, the data hash and the window.
    The stage writes it into meta.json; `attach` refuses a cache whose meta.json says otherwise."""
    return {"teacher": folder_sha256(teacher_dir), "data_hash": data_hash(data_report), "max_length": max_length}


def transfer_sha256(texts: list[str]) -> str:
    """The transfer texts' hash (in meta.json, and in the study key: new texts start a new study)."""
    return sha256("\n".join(texts))


def sharded_predict(model, data: Examples, pad_id: int, batch_size: int, *, hidden_states: bool, desc: str,
                    world: World) -> tuple[np.ndarray, list[np.ndarray]]:
    """predict_logits over `data`, each rank scoring its share and rank 0 gathering them in data order (the other
    ranks get empty results)."""
    mine = world.shard(range(len(data)))
    part = predict_logits(model, data.subset(mine), pad_id, batch_size, hidden_states=hidden_states,
                          desc=desc if world.main else None)
    parts = gather_objects((mine, part), world)
    if not world.main:
        return np.empty(0), []
    logits = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    hidden: list[np.ndarray] = [np.empty(0)] * len(data) if hidden_states else []
    for indices, (part_logits, part_hidden) in parts:
        logits[indices] = part_logits
        for row, i in enumerate(indices if hidden_states else ()):
            hidden[i] = part_hidden[row]
    return logits, hidden


def compute(model, examples: dict[str, Examples], pad_id: int, out: Path, *, batch_size: int,
            hidden_states: bool, meta: dict, world: World = SINGLE) -> dict:
    """Cache the teacher's outputs of every split in `out` (and return meta.json's content). On several processes
    the rows are computed sharded and gathered to rank 0, which alone writes."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split, data in examples.items():
        desc = f"teacher outputs ({split})"
        if world.distributed:
            logits, hidden = sharded_predict(model, data, pad_id, batch_size, hidden_states=hidden_states, desc=desc,
                                             world=world)
            if not world.main:
                continue
        else:
            logits, hidden = predict_logits(model, data, pad_id, batch_size, hidden_states=hidden_states, desc=desc)
        np.save(out / f"{split}_logits.npy", logits)
        if hidden_states:
            offsets = np.cumsum([0] + [len(h) for h in hidden]).astype(np.int64)
            np.save(out / f"{split}_hidden.npy", np.concatenate(hidden))
            np.save(out / f"{split}_offsets.npy", offsets)
        rows[split] = len(data)
    meta = {**meta, "rows": rows, "hidden_states": hidden_states,
            "hidden_size": int(model.config.hidden_size)}
    if world.main:
        (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def attach(examples: Examples, cache: Path, split: str, *, expect: dict, with_hidden: bool) -> Examples:
    """Add cached teacher outputs to `examples`, refusing a cache made for other inputs."""
    meta_path = cache / "meta.json"
    if not meta_path.exists():
        raise StaleCacheError(f"{cache} holds no teacher outputs: run `dvc repro teacher_outputs`")
    meta = json.loads(meta_path.read_text())
    for key, value in expect.items():
        if meta.get(key) != value:
            raise StaleCacheError(f"teacher outputs in {cache} were made with {key}={meta.get(key)!r}, "
                                  f"expected {value!r}: rerun `dvc repro teacher_outputs`")
    if meta["rows"].get(split) != len(examples):
        raise StaleCacheError(f"teacher outputs hold {meta['rows'].get(split)} {split} rows, data has {len(examples)}")
    examples.teacher_logits = np.load(cache / f"{split}_logits.npy")
    if with_hidden:
        if not meta.get("hidden_states"):
            raise StaleCacheError("the cosine loss needs teacher hidden states: set "
                                  "teacher_outputs.hidden_states: true and rerun `dvc repro`")
        flat = np.load(cache / f"{split}_hidden.npy", mmap_mode="r")
        offsets = np.load(cache / f"{split}_offsets.npy")
        examples.teacher_hidden = [np.asarray(flat[offsets[i]: offsets[i + 1]]) for i in range(len(examples))]
        lengths = [len(h) for h in examples.teacher_hidden]
        if lengths != [len(ids) for ids in examples.input_ids]:
            raise StaleCacheError("cached hidden states do not line up with the tokenized texts")
    return examples


def transfer_texts(cache: Path) -> list[str]:
    """The cached transfer texts (none when the teacher_outputs stage was given none)."""
    path = cache / TRANSFER_FILE
    return path.read_text().splitlines() if path.exists() else []
