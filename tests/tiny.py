"""Tiny real models and fixture data for tests: 2-layer, hidden-32 encoders and a small review set.

Built in-test (no download): a WordPiece tokenizer over a small vocabulary, saved in the
Hugging Face format, so every code path loads it exactly as it loads a hub model.
"""

from __future__ import annotations

import itertools
import random
import zipfile
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    MPNetConfig,
    PreTrainedTokenizerFast,
)

POSITIVE = ["great", "wonderful", "superb", "moving", "funny", "brilliant", "charming", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "tedious", "clumsy", "bland", "messy", "lifeless"]
FILLER = ["the", "a", "this", "film", "movie", "story", "acting", "plot", "is", "was", "and", "but", "very",
          "quite", "really"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER)) + [f"m{i}" for i in range(40)]


def make_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_model(folder: Path, *, layers: int = 2, hidden: int = 32, arch: str = "bert",
                    labels: tuple[str, ...] = ("rotten", "fresh"), seed: int = 0, dropout: float = 0.1) -> Path:
    """Save a randomly initialised tiny encoder + classifier head and its tokenizer to `folder` (`dropout`: 0 makes
    a step a function of the batch alone, as comparing runs on different process counts needs)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    common = dict(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=hidden * 2, max_position_embeddings=80, num_labels=len(labels),
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                  id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    config = BertConfig(**common) if arch == "bert" else MPNetConfig(**common)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def make_reviews(n_movies: int = 40, per_movie: int = 6, seed: int = 0) -> pd.DataFrame:
    """Rotten-Tomatoes-shaped rows (category, text, movie_name) whose label the words decide."""
    rng = random.Random(seed)
    rows = []
    for m in range(n_movies):
        for _ in range(per_movie):
            fresh = rng.random() < 0.55
            words = rng.sample(POSITIVE if fresh else NEGATIVE, 2) + rng.sample(FILLER, rng.randint(2, 6))
            rng.shuffle(words)
            rows.append({"category": "fresh" if fresh else "rotten", "text": " ".join(words),
                         "movie_name": f"m{m}"})
        rows.append({"category": "plot", "text": f"a plot summary of movie m{m}", "movie_name": f"m{m}"})
    return pd.DataFrame(rows)


def make_trained_student(root: Path, *, max_length: int = 32) -> Path:
    """A tiny student briefly trained on the fixture task, so its logits mean something (a random model's are
    about +-0.03: any tolerance would pass a model returning zeros), saved as the distill stage saves it."""
    from distilops.pipeline.batching import tokenize
    from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
    from distilops.pipeline.training import TrainSettings, train

    raw = make_tiny_model(root / "raw", layers=2, hidden=64)
    model, tokenizer = load_classifier(str(raw)), load_tokenizer(str(raw))
    df = make_reviews(n_movies=40, per_movie=6, seed=1)
    df = df[df["category"] != "plot"]
    data = tokenize(tokenizer, df["text"].tolist(), (df["category"] == "fresh").astype(int).to_numpy(), 32)
    train(model, data, data, tokenizer.pad_token_id,
          TrainSettings(epochs=8, batch_size=16, learning_rate=3e-3, progress=None))
    return save_model_folder(model.cpu(), tokenizer, root / "student", max_length=max_length, role="student",
                             teacher="tiny")


def make_calibration_texts() -> list[str]:
    """Reviews of other movies than the fixture's checked texts (another seed): what onnx_int8_static calibrates
    on in tests, as the quantize stage calibrates on training texts."""
    df = make_reviews(n_movies=20, per_movie=5, seed=2)
    return df[df["category"] != "plot"]["text"].tolist()


def make_wheel(folder: Path, name: str, payload_bytes: int, requires: tuple[str, ...] = ()) -> int:
    """A pure-Python wheel whose one module holds `payload_bytes` zeros (compressed: the wheel is far smaller than
    what it installs); returns the bytes its files hold, uncompressed."""
    module = name.replace("-", "_")
    info = f"{module}-1.0.dist-info"
    files = {f"{module}/__init__.py": "#" * payload_bytes,
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
                 name, "".join(f"Requires-Dist: {r}\n" for r in requires)),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/RECORD": ""}
    with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
    return sum(len(text) for text in files.values())


REGISTRATIONS = itertools.count()


def distinct(folder: Path) -> Path:
    """`folder` made distinct from every earlier registration (a counter in its distilops.json): the registry
    adds no version for a folder it already holds, and these tests want a new one each time."""
    from distilops.serving.folder import write_meta

    write_meta(folder, registration=next(REGISTRATIONS))
    return folder
