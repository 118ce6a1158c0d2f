"""DVC stage `teacher_outputs`: run the fine-tuned teacher once over train and validation and cache
its logits (and optionally hidden states), so no tuning trial runs the teacher again."""

import sys
from pathlib import Path

from distilops.config import ConfigError, TeacherOutputsConfig, load_section
from distilops.data import DataError, read_split
from distilops.modeling import ModelError, load_classifier, load_tokenizer
from distilops.teacher_outputs import SPLITS, compute, folder_fingerprint
from distilops.tracking import data_hash
from distilops.training import tokenize

DATA, TEACHER, OUT = Path("data/prepared"), Path("models/teacher"), Path("data/teacher_outputs")


def main() -> None:
    cfg = load_section(TeacherOutputsConfig, "teacher_outputs")
    tokenizer = load_tokenizer(str(TEACHER))
    model = load_classifier(str(TEACHER))
    examples = {}
    for split in SPLITS:
        frame = read_split(DATA, split)
        examples[split] = tokenize(tokenizer, frame["text"], frame["label"], cfg.max_length)
    meta = compute(model, examples, tokenizer.pad_token_id, OUT, batch_size=cfg.batch_size,
                   hidden_states=cfg.hidden_states,
                   meta={"teacher": folder_fingerprint(TEACHER), "data_hash": data_hash(),
                         "max_length": cfg.max_length})
    print(f"[teacher_outputs] cached {meta['rows']} (hidden states: {cfg.hidden_states})")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ModelError) as exc:
        sys.exit(f"teacher_outputs: error: {exc}")
