"""DVC stage `long_texts`: an evaluation set of long documents built offline from the test split (one
movie's reviews with one label joined until a document has `min_words` words), so the windowed reading
of long texts is measured on texts no model trained on. `evaluate.extra_sets` scores it."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging

from distilops import paths
from distilops.config import LongTextsConfig, load_section
from distilops.pipeline.data import build_long_texts, read_labels, read_split
from distilops.stage import run_stage, write_json

log = logging.getLogger("long_texts")


def main() -> None:
    cfg = load_section(LongTextsConfig)
    documents = build_long_texts(read_split("test"), read_labels(), cfg.min_words)
    documents.to_parquet(paths.LONG_TEXTS, index=False)
    words = documents["text"].str.split().str.len()
    report = {"documents": len(documents), "movies": int(documents["group"].nunique()),
              "per_label": documents["label"].value_counts().sort_index().to_dict(),
              "words_min": int(words.min()), "words_p50": float(words.median()), "words_max": int(words.max()),
              "reviews_per_document_p50": float(documents["reviews"].median())}
    write_json(paths.metrics_file("long_texts"), report)
    log.info("%d documents from %d movies, %d-%d words (median %.0f)", report["documents"], report["movies"],
             report["words_min"], report["words_max"], report["words_p50"])


if __name__ == "__main__":
    run_stage("long_texts", main)
