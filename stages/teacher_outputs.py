"""DVC stage `teacher_outputs`: run the fine-tuned teacher once over train and validation (and any
unlabelled transfer texts) and cache its logits (and optionally hidden states), so no tuning trial
runs the teacher again. With `teacher_outputs.distributed` above one process (torchrun: pipeline/distributed.py)
every rank scores its share of each split and rank 0 gathers and writes them."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging

from distilops import paths
from distilops.config import TeacherOutputsConfig, load_section
from distilops.pipeline.batching import tokenize
from distilops.pipeline.data import SPLITS, read_split
from distilops.pipeline.distributed import World, session
from distilops.pipeline.losses import UNLABELLED
from distilops.pipeline.modeling import load_classifier, load_tokenizer
from distilops.pipeline.teacher_outputs import (
    TEACHER_SPLITS,
    TRANSFER,
    TRANSFER_FILE,
    compute,
    fingerprint,
    transfer_sha256,
)
from distilops.pipeline.transfer import load_transfer_texts
from distilops.stage import run_stage

log = logging.getLogger("teacher_outputs")


def main() -> None:
    cfg = load_section(TeacherOutputsConfig)
    with session(cfg.distributed, "teacher_outputs") as world:
        cache_outputs(cfg, world)


def cache_outputs(cfg: TeacherOutputsConfig, world: World) -> None:
    tokenizer = load_tokenizer(str(paths.TEACHER))
    model = load_classifier(str(paths.TEACHER))
    examples = {}
    for split in TEACHER_SPLITS:
        frame = read_split(split)
        examples[split] = tokenize(tokenizer, frame["text"], frame["label"], cfg.max_length)
    meta = fingerprint(paths.TEACHER, paths.DATA_REPORT, cfg.max_length)
    paths.TEACHER_OUTPUTS.mkdir(parents=True, exist_ok=True)
    if world.main:
        (paths.TEACHER_OUTPUTS / TRANSFER_FILE).unlink(missing_ok=True)
    if cfg.transfer_texts:
        labelled = {t for split in SPLITS for t in read_split(split)["text"]}  # no test text leaks in
        texts = load_transfer_texts(cfg.transfer_texts, cfg.transfer_max_texts, cfg.seed, exclude=labelled)
        if world.main:
            (paths.TEACHER_OUTPUTS / TRANSFER_FILE).write_text("\n".join(texts) + "\n")
        examples[TRANSFER] = tokenize(tokenizer, texts, [UNLABELLED] * len(texts), cfg.max_length)
        meta["transfer_sha256"] = transfer_sha256(texts)
        log.info("%d transfer texts from %s", len(texts), cfg.transfer_texts)
    meta = compute(model, examples, tokenizer.pad_token_id, paths.TEACHER_OUTPUTS, batch_size=cfg.batch_size,
                   hidden_states=cfg.hidden_states, meta=meta, world=world)
    log.info("cached %s (hidden states: %s)", meta["rows"], cfg.hidden_states)


if __name__ == "__main__":
    run_stage("teacher_outputs", main)
