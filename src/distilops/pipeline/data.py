"""Data preparation: load a source, clean it, split it without leakage, validate, report.

Rules (in order): strip texts; drop empty texts; drop rows whose label is in `drop_labels`;
drop exact duplicate texts (first kept, so no text can land in two splits); every other label
must be one of `labels`. Splits are stratified by label and, when a group column is set,
grouped by it (no movie's reviews cross splits), deterministic for a given seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from distilops import paths
from distilops.config import TABLE_FILE_TYPES, EvalSet, PrepareConfig
from distilops.errors import DataError
from distilops.hashing import sha256
from distilops.pipeline.assets import CATALOGUE, fetch

SPLITS = ("train", "validation", "test")
READERS = {"csv": pd.read_csv, "jsonl": lambda p: pd.read_json(p, lines=True), "parquet": pd.read_parquet}
LOCAL_READERS = {suffix: READERS[kind] for suffix, kind in TABLE_FILE_TYPES.items()}  # the suffixes: config.py


@dataclass
class CleanStats:
    loaded: int
    empty_text: int
    dropped_labels: int
    duplicates: int
    kept: int


def load_source(source: str, split: str | None = None) -> pd.DataFrame:
    """A catalogue data set, a local file, or (otherwise) a Hugging Face hub data set, as one frame
    (for a hub data set: one `split` of it, or every split pooled)."""
    if source in CATALOGUE and CATALOGUE[source].kind == "dataset":
        return pd.read_csv(fetch(source))
    path = Path(source)
    if path.suffix in LOCAL_READERS or path.exists():
        if not path.exists():
            raise DataError(f"data file '{source}' not found")
        reader = LOCAL_READERS.get(path.suffix)
        if reader is None:
            raise DataError(f"'{source}': unsupported file type (use {sorted(LOCAL_READERS)})")
        return reader(path)
    return _load_hub_dataset(source, split)


def _load_hub_dataset(name: str, split: str | None = None) -> pd.DataFrame:
    import datasets  # only online, for hub ids: importing it costs seconds the offline default never needs

    try:
        loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as exc:  # the hub raises many types; the user needs the name and the reason
        raise DataError(
            f"could not load '{name}' from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Offline, use a catalogue data set ({sorted(k for k, a in CATALOGUE.items() if a.kind == 'dataset')}) "
            "or a local .csv/.jsonl/.parquet file."
        ) from exc
    if split:
        return loaded.to_pandas()
    # Our own split rules apply, so the hub's splits are pooled (unlabelled rows, e.g. imdb's
    # `unsupervised` split with label -1, are removed by the label check unless dropped).
    return pd.concat([split.to_pandas() for split in loaded.values()], ignore_index=True)


def clean(df: pd.DataFrame, cfg: PrepareConfig) -> tuple[pd.DataFrame, CleanStats]:
    """Select and normalise columns, then apply the cleaning rules; returns text/label/(group)."""
    required = [cfg.text_column, cfg.label_column] + ([cfg.group_column] if cfg.group_column else [])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; the data has {list(df.columns)}")

    out = pd.DataFrame({
        "text": df[cfg.text_column].astype("string").str.strip(),
        "label_value": df[cfg.label_column].astype(str),
    })
    if cfg.group_column:
        out["group"] = df[cfg.group_column].astype(str)
    loaded = len(out)

    empty = out["text"].isna() | (out["text"] == "")
    out = out[~empty]
    dropped = out["label_value"].isin([str(v) for v in cfg.drop_labels])
    out = out[~dropped]
    before = len(out)
    out = out.drop_duplicates(subset="text", keep="first")
    duplicates = before - len(out)

    label_ids = {str(v): i for i, v in enumerate(cfg.labels)}
    unknown = sorted(set(out["label_value"]) - set(label_ids))
    if unknown:
        raise DataError(
            f"label value(s) {unknown[:10]} are neither in prepare.labels {cfg.labels} nor in "
            f"prepare.drop_labels {cfg.drop_labels}"
        )
    out = out.assign(label=out["label_value"].map(label_ids).astype("int64")).drop(columns="label_value")
    out = out.reset_index(drop=True)
    out["text"] = out["text"].astype(str)
    stats = CleanStats(loaded, int(empty.sum()), int(dropped.sum()), duplicates, len(out))
    return out, stats


def split(df: pd.DataFrame, cfg: PrepareConfig) -> dict[str, pd.DataFrame]:
    """Deterministic train/validation/test split, stratified by label, grouped when a group column exists."""
    groups = df["group"].to_numpy() if "group" in df else np.arange(len(df))
    if len(np.unique(groups)) < 10:
        raise DataError(f"need at least 10 groups (or rows) to split, got {len(np.unique(groups))}")

    def hold_out(frame: pd.DataFrame, frame_groups: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        n_splits = max(2, round(1 / fraction))
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=cfg.seed)
        rest, held = next(folds.split(frame, frame["label"], frame_groups))
        return rest, held

    rest_idx, test_idx = hold_out(df, groups, cfg.test_size)
    rest = df.iloc[rest_idx].reset_index(drop=True)
    train_idx, val_idx = hold_out(rest, groups[rest_idx], cfg.validation_size / (1 - cfg.test_size))
    return {
        "train": rest.iloc[train_idx].reset_index(drop=True),
        "validation": rest.iloc[val_idx].reset_index(drop=True),
        "test": df.iloc[test_idx].reset_index(drop=True),
    }


def validate(splits: dict[str, pd.DataFrame], cfg: PrepareConfig) -> None:
    """No text or group in two splits; every class has enough examples in every split."""
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = set(splits[a]["text"]) & set(splits[b]["text"])
            if shared:
                raise DataError(f"leakage: {len(shared)} text(s) in both {a} and {b}, e.g. {next(iter(shared))!r}")
            if "group" in splits[a]:
                shared_groups = set(splits[a]["group"]) & set(splits[b]["group"])
                if shared_groups:
                    raise DataError(f"leakage: group(s) {sorted(shared_groups)[:5]} in both {a} and {b}")
    for name in SPLITS:
        counts = splits[name]["label"].value_counts()
        for class_id, label in enumerate(cfg.labels):
            n = int(counts.get(class_id, 0))
            if n < cfg.min_examples_per_class:
                raise DataError(
                    f"class '{label}' has {n} example(s) in the {name} split; prepare.min_examples_per_class "
                    f"is {cfg.min_examples_per_class} (more data, fewer classes or a lower minimum)"
                )


def content_hash(splits: dict[str, pd.DataFrame]) -> str:
    """sha256 over the split contents (format-independent: the same rows give the same hash)."""
    return sha256(part for name in SPLITS for part in (name, splits[name][["text", "label"]].to_csv(index=False)))


def report(splits: dict[str, pd.DataFrame], stats: CleanStats, cfg: PrepareConfig) -> dict:
    def split_report(frame: pd.DataFrame) -> dict:
        words = frame["text"].str.split().str.len()
        entry = {
            "examples": len(frame),
            "per_label": {str(label): int((frame["label"] == i).sum()) for i, label in enumerate(cfg.labels)},
            "words_p50": float(words.quantile(0.5)),
            "words_p95": float(words.quantile(0.95)),
            "words_max": int(words.max()),
        }
        if "group" in frame:
            entry["groups"] = int(frame["group"].nunique())
        return entry

    return {
        "source": cfg.source,
        "labels": [str(v) for v in cfg.labels],
        "data_hash": content_hash(splits),
        "cleaning": vars(stats),
        "total_examples": sum(len(s) for s in splits.values()),
        "splits": {name: split_report(splits[name]) for name in SPLITS},
    }


def prepare(cfg: PrepareConfig) -> tuple[dict[str, pd.DataFrame], dict]:
    raw = load_source(cfg.source)
    cleaned, stats = clean(raw, cfg)
    if cfg.max_examples and len(cleaned) > cfg.max_examples:
        cleaned = cleaned.sample(n=cfg.max_examples, random_state=cfg.seed).reset_index(drop=True)
    splits = split(cleaned, cfg)
    validate(splits, cfg)
    return splits, report(splits, stats, cfg)


def read_split(name: str, folder: str | Path = paths.PREPARED) -> pd.DataFrame:
    path = Path(folder) / f"{name}.parquet"
    if not path.exists():
        raise DataError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    return pd.read_parquet(path)


def read_labels(report: str | Path = paths.DATA_REPORT) -> list[str]:
    """The label names, in class-id order, that the prepare stage recorded."""
    try:
        return json.loads(Path(report).read_text())["labels"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{report} holds no labels: run the prepare stage first (`dvc repro prepare`)") from exc


# --- evaluation sets beyond the test split ------------------------------------------------------------


def build_long_texts(test: pd.DataFrame, label_names: list[str], min_words: int) -> pd.DataFrame:
    """Documents of at least `min_words` words from the test split: one movie's reviews with one label,
    joined in order; a remainder too short for a document of its own joins the last one. Every text is
    a test text, so none crosses splits. Columns: text, label (the label name), group, reviews."""
    if "group" not in test:
        raise DataError("long texts need the test split's groups (prepare.group_column): without them reviews "
                        "of different items would be joined")
    documents = []
    for (group, label), frame in test.groupby(["group", "label"], sort=True):
        current: list[str] = []
        chunks: list[list[str]] = []
        for text in frame["text"]:
            current.append(text)
            if sum(len(t.split()) for t in current) >= min_words:
                chunks.append(current)
                current = []
        if current and chunks:
            chunks[-1] += current
        documents += [{"text": " ".join(chunk), "label": label_names[int(label)], "group": group,
                       "reviews": len(chunk)} for chunk in chunks]
    if not documents:
        raise DataError(f"no movie has {min_words} words of reviews with one label in the test split: lower "
                        "long_texts.min_words")
    return pd.DataFrame(documents)


def load_eval_set(spec: EvalSet, label_names: list[str], seed: int = 0) -> pd.DataFrame:
    """An extra evaluation set as text + label id, or a DataError naming the set, the file and the problem."""
    where = f"evaluate.extra_sets '{spec.name}' ({spec.source})"
    try:
        frame = load_source(spec.source, spec.split)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    missing = [c for c in (spec.text_column, spec.label_column) if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: no column(s) {missing}; it has {list(frame.columns)}")
    mapping = {str(k): v for k, v in spec.labels.items()} or {name: name for name in label_names}
    unknown_targets = sorted(set(mapping.values()) - set(label_names))
    if unknown_targets:
        raise DataError(f"{where}: labels maps to {unknown_targets}, which the model does not have {label_names}")
    values = frame[spec.label_column].astype(str)
    outside = sorted(set(values) - set(mapping))
    if outside:
        raise DataError(f"{where}: label value(s) {outside[:10]} are outside its label mapping {sorted(mapping)} "
                        "(set `labels` for this set)")
    ids = {name: i for i, name in enumerate(label_names)}
    out = pd.DataFrame({"text": frame[spec.text_column].astype(str),
                        "label": values.map(mapping).map(ids).astype("int64")})
    out = out[out["text"].str.strip() != ""].reset_index(drop=True)
    if out.empty:
        raise DataError(f"{where}: no rows with text")
    if spec.max_examples and len(out) > spec.max_examples:
        out = out.sample(n=spec.max_examples, random_state=seed).reset_index(drop=True)
    return out
