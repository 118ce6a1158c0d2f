"""The real `dvc repro` of the prepare stage in a temporary copy of the repository."""

import json

import pytest
from tiny import make_reviews

pytestmark = pytest.mark.slow


def test_dvc_repro_prepare_runs_then_skips_then_reruns_on_param_change(repo_copy):
    make_reviews(n_movies=60).to_csv(repo_copy.path / "reviews.csv", index=False)
    repo_copy.set_params({"prepare.source": "reviews.csv", "prepare.min_examples_per_class": 3})

    first = repo_copy.dvc("repro", "prepare")
    assert "Running stage 'prepare'" in first.stdout
    report = json.loads((repo_copy.path / "data/prepared/report.json").read_text())
    assert report["cleaning"]["dropped_labels"] == 60  # one plot row per movie
    assert sum(s["examples"] for s in report["splits"].values()) == report["total_examples"] == 360
    assert (repo_copy.path / "dvc.lock").exists()

    second = repo_copy.dvc("repro", "prepare")
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout

    # Stage detail is not a DVC metrics file (metrics/summary.json is), but `dvc metrics show FILE` reads it.
    metrics = json.loads(repo_copy.dvc("metrics", "show", "--json", "data/prepared/report.json").stdout)
    (entry,) = metrics.values()
    assert entry["data"]["data/prepared/report.json"]["data"]["total_examples"] == 360

    repo_copy.set_params({"seed": 7})
    third = repo_copy.dvc("repro", "prepare")
    assert "Running stage 'prepare'" in third.stdout
    assert json.loads((repo_copy.path / "data/prepared/report.json").read_text())["data_hash"] != report["data_hash"]


def test_bad_input_fails_the_stage_with_a_clear_message(repo_copy):
    make_reviews(n_movies=60).drop(columns="movie_name").to_csv(repo_copy.path / "reviews.csv", index=False)
    repo_copy.set_params({"prepare.source": "reviews.csv"})
    result = repo_copy.dvc("repro", "prepare", check=False)
    assert result.returncode != 0
    assert "prepare: error: missing column(s) ['movie_name']" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
