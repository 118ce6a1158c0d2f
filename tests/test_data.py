"""Cleaning, validation and split rules on small fixture data."""

import pandas as pd
import pytest
from tiny import make_reviews

from distilops.config import EvalSet, PrepareConfig
from distilops.errors import ConfigError, DataError
from distilops.pipeline.data import (
    build_long_texts,
    clean,
    content_hash,
    load_eval_set,
    load_source,
    prepare,
    split,
    validate,
)


def cfg(**overrides) -> PrepareConfig:
    base = dict(source="x.csv", text_column="text", label_column="category", group_column="movie_name",
                labels=["rotten", "fresh"], drop_labels=["plot"], min_examples_per_class=3, seed=7)
    return PrepareConfig(**{**base, **overrides})


def test_clean_strips_and_drops_empty_plot_and_duplicates():
    df = pd.DataFrame({
        "category": ["fresh", "rotten", "plot", "fresh", "fresh", "rotten"],
        "text": ["  great film ", "awful", "a plot summary", "", None, "great film"],
        "movie_name": ["a", "b", "c", "d", "e", "f"],
    })
    out, stats = clean(df, cfg())
    assert out["text"].tolist() == ["great film", "awful"]  # stripped; the second 'great film' dropped
    assert out["label"].tolist() == [1, 0]
    assert (stats.loaded, stats.empty_text, stats.dropped_labels, stats.duplicates, stats.kept) == (6, 2, 1, 1, 2)


def test_missing_column_is_named():
    df = make_reviews().drop(columns="movie_name")
    with pytest.raises(DataError, match=r"missing column\(s\) \['movie_name'\]"):
        clean(df, cfg())


def test_unexpected_label_is_named():
    df = make_reviews()
    df.loc[0, "category"] = "spoiled"
    with pytest.raises(DataError, match="spoiled"):
        clean(df, cfg())


def test_split_keeps_groups_apart_and_is_deterministic():
    cleaned, _ = clean(make_reviews(n_movies=60), cfg())
    a, b = split(cleaned, cfg()), split(cleaned, cfg())
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    groups = {name: set(frame["group"]) for name, frame in a.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    assert sum(len(f) for f in a.values()) == len(cleaned)
    other_seed = split(cleaned, cfg(seed=8))
    assert set(other_seed["test"]["group"]) != groups["test"]


def test_split_is_stratified():
    cleaned, _ = clean(make_reviews(n_movies=200, per_movie=5), cfg())
    parts = split(cleaned, cfg())
    overall = cleaned["label"].mean()
    for frame in parts.values():
        assert abs(frame["label"].mean() - overall) < 0.08


def test_leakage_is_caught():
    cleaned, _ = clean(make_reviews(n_movies=60), cfg())
    parts = split(cleaned, cfg())
    leaked = pd.concat([parts["test"], parts["train"].head(1)], ignore_index=True)
    with pytest.raises(DataError, match="leakage: 1 text"):
        validate({**parts, "test": leaked}, cfg(group_column=""))  # by text, even with groups ignored


def test_too_few_examples_of_a_class_is_a_clear_error():
    df = make_reviews(n_movies=60)
    rotten = df.index[df["category"] == "rotten"]
    df = df.drop(rotten[5:])  # five rotten reviews left in the whole set
    with pytest.raises(DataError, match="class 'rotten' has .* example"):
        prepare_from(df, cfg(min_examples_per_class=3))


def prepare_from(df: pd.DataFrame, config: PrepareConfig):
    cleaned, _ = clean(df, config)
    parts = split(cleaned, config)
    validate(parts, config)
    return parts


def test_prepare_from_local_files_in_each_format(tmp_path):
    df = make_reviews(n_movies=60)
    reports = []
    for suffix, writer in ((".csv", lambda p: df.to_csv(p, index=False)),
                           (".jsonl", lambda p: df.to_json(p, orient="records", lines=True)),
                           (".parquet", lambda p: df.to_parquet(p, index=False))):
        path = tmp_path / f"reviews{suffix}"
        writer(path)
        _, report = prepare(cfg(source=str(path)))
        reports.append(report)
    assert len({r["data_hash"] for r in reports}) == 1  # same rows, same hash, whatever the format
    assert reports[0]["cleaning"]["dropped_labels"] == 60
    assert reports[0]["splits"]["train"]["examples"] > reports[0]["splits"]["test"]["examples"] > 0


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_source(str(tmp_path / "nope.csv"))


def test_content_hash_changes_with_content():
    cleaned, _ = clean(make_reviews(n_movies=60), cfg())
    parts = split(cleaned, cfg())
    changed = {**parts, "test": parts["test"].assign(label=1 - parts["test"]["label"])}
    assert content_hash(parts) != content_hash(changed)


@pytest.mark.parametrize("overrides,key", [
    (dict(labels=["only"]), "labels"),
    (dict(test_size=0.7), "test_size"),
    (dict(min_examples_per_class=0), "min_examples_per_class"),
])
def test_bad_params_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"prepare.{key}"):
        cfg(**overrides)


def test_long_texts_join_one_movies_reviews_with_one_label():
    test = pd.DataFrame({"text": ["good one two", "great three four", "fine five six", "bad one", "awful two",
                                  "nice seven eight"],
                         "label": [1, 1, 1, 0, 0, 1], "group": ["m1", "m1", "m1", "m1", "m1", "m2"]})
    docs = build_long_texts(test, ["rotten", "fresh"], min_words=5)
    # m1/fresh: 3 + 3 words reach 5, the 3-word remainder joins that document; m1/rotten (4 words) and m2 are short
    assert docs[["text", "label", "group", "reviews"]].values.tolist() == [
        ["good one two great three four fine five six", "fresh", "m1", 3]]
    with pytest.raises(DataError, match="lower long_texts.min_words"):
        build_long_texts(test, ["rotten", "fresh"], min_words=50)
    with pytest.raises(DataError, match="groups"):
        build_long_texts(test.drop(columns="group"), ["rotten", "fresh"], min_words=5)


def test_an_extra_set_loads_with_its_label_mapping(tmp_path):
    path = tmp_path / "reviews.jsonl"
    pd.DataFrame({"review": ["loved it", "hated it", " "], "stars": [1, 0, 1]}).to_json(path, orient="records",
                                                                                         lines=True)
    spec = EvalSet(name="stars", source=str(path), text_column="review", label_column="stars",
                   labels={0: "rotten", 1: "fresh"})
    frame = load_eval_set(spec, ["rotten", "fresh"])
    assert frame.to_dict("list") == {"text": ["loved it", "hated it"], "label": [1, 0]}  # blank text dropped


@pytest.mark.parametrize(("change", "message"), [
    ({"source": "missing.csv"}, r"'stars' \(missing.csv\): data file 'missing.csv' not found"),
    ({"text_column": "body"}, r"'stars' \(.*reviews.csv\): no column\(s\) \['body'\]"),
    ({"labels": {0: "rotten"}}, r"reviews.csv\): label value\(s\) \['1'\] are outside its label mapping"),
    ({"labels": {}}, r"label value\(s\) \['0', '1'\] are outside"),
    ({"labels": {0: "rotten", 1: "great"}}, r"labels maps to \['great'\], which the model does not have"),
])
def test_a_bad_extra_set_names_the_file_and_the_problem(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"review": ["loved it", "hated it"], "stars": [1, 0]}).to_csv("reviews.csv", index=False)
    fields = {"name": "stars", "source": str(tmp_path / "reviews.csv"), "text_column": "review",
              "label_column": "stars", "labels": {0: "rotten", 1: "fresh"}, **change}
    with pytest.raises(DataError, match=message):
        load_eval_set(EvalSet(**fields), ["rotten", "fresh"])
