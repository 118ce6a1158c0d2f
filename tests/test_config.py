"""params.yaml loading: shared keys, unknown keys, nested sections."""

from pathlib import Path

import pytest
import yaml

from distilops.config import DistillConfig, TeacherConfig, load_section
from distilops.errors import ConfigError


def write(tmp_path, data) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shared_keys_fill_sections(tmp_path):
    path = write(tmp_path, {"seed": 3, "max_length": 48, "teacher": {"model": "m", "epochs": 1}})
    cfg = load_section(TeacherConfig, path)
    assert (cfg.seed, cfg.max_length, cfg.epochs, cfg.model) == (3, 48, 1, "m")


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, {"teacher": {"epochz": 1}})
    with pytest.raises(ConfigError, match=r"teacher.epochz: unknown key; known keys: \['batch_size'"):
        load_section(TeacherConfig, path)


def test_nested_search_space_is_validated(tmp_path):
    path = write(tmp_path, {"distill": {"search": {"alpha": [0.9, 0.1]}}})
    with pytest.raises(ConfigError, match="distill.search.alpha"):
        load_section(DistillConfig, path)
    path = write(tmp_path, {"distill": {"search": {"temperature": [2, 2]}}})
    assert load_section(DistillConfig, path).search.temperature == [2.0, 2.0]



@pytest.mark.parametrize("key", ["cosine_weight", "hidden_mse_weight", "attention_weight"])
def test_loss_weight_ranges_are_validated_and_off_by_default(tmp_path, key):
    assert getattr(DistillConfig().search, key) == [0.0, 0.0]
    for bad in ([-0.1, 0.5], [0.5, 0.1], [0.5]):
        with pytest.raises(ConfigError, match=f"distill.search.{key}"):
            load_section(DistillConfig, write(tmp_path, {"distill": {"search": {key: bad}}}))
    assert getattr(load_section(DistillConfig, write(tmp_path, {"distill": {"search": {key: [0, 2]}}})).search,
                   key) == [0.0, 2.0]


def test_missing_section_and_file(tmp_path):
    with pytest.raises(ConfigError, match="no 'teacher' section"):
        load_section(TeacherConfig, write(tmp_path, {"seed": 1}))
    with pytest.raises(ConfigError, match="not found"):
        load_section(TeacherConfig, tmp_path / "missing.yaml")


def written_in(written: object, loaded: object) -> list[str]:
    """Where `loaded` differs from what params.yaml wrote (`written`): keys it lacks or values it changed."""
    if isinstance(written, dict):
        if not isinstance(loaded, dict):
            return [f"{written!r} became {loaded!r}"]
        return [f"{k}: {why}" for k, v in written.items()
                for why in ([f"missing (got {sorted(loaded)})"] if k not in loaded else written_in(v, loaded[k]))]
    if isinstance(written, list) and isinstance(loaded, list) and len(written) == len(loaded):
        return [why for w, v in zip(written, loaded, strict=True) for why in written_in(w, v)]
    return [] if written == loaded else [f"{written!r} became {loaded!r}"]


def test_repository_params_load_as_written():
    """Every section of the repository's params.yaml loads, holding exactly the values written there (and the shared
    top-level keys it declares)."""
    from distilops.config import SECTIONS, SHARED_KEYS

    params = yaml.safe_load(Path("params.yaml").read_text())
    for cls in SECTIONS:
        loaded = load_section(cls).model_dump()
        shared = {k: params[k] for k in SHARED_KEYS if k in cls.model_fields and k in params}
        written = {**shared, **(params[cls.SECTION] or {})}
        assert written and not written_in(written, loaded), (cls.SECTION, written_in(written, loaded))
    assert written_in({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}) == ["a: b: 2 became 3"]  # the comparison sees one


def test_unlabeled_sets_default_to_held_apart_general_text_and_are_validated(tmp_path):
    from distilops.config import EvaluateConfig

    (default,) = load_section(EvaluateConfig).unlabeled_sets  # the repository's params.yaml
    assert (default.name, default.source, default.max_texts) == ("general_text", "general_english", 0)
    assert [s.name for s in EvaluateConfig().unlabeled_sets] == ["general_text"]
    logs = {"name": "requests", "source": "logs/requests.jsonl", "max_texts": 500}
    assert load_section(EvaluateConfig, write(tmp_path, {"evaluate": {"unlabeled_sets": [logs]}})
                        ).unlabeled_sets[0].max_texts == 500
    bad = {"evaluate": {"unlabeled_sets": [{"name": "requests", "source": "logs.xlsx"}]}}
    with pytest.raises(ConfigError, match=r"unlabeled_sets.source: must be 'general_english' or a local .txt"):
        load_section(EvaluateConfig, write(tmp_path, bad))
    for names, extra in ((["a", "a"], []), (["test"], []), (["long"], ["long"])):
        data = {"unlabeled_sets": [{"name": n, "source": "x.txt"} for n in names],
                "extra_sets": [{"name": n, "source": "y.csv"} for n in extra]}
        with pytest.raises(ConfigError, match=r"evaluate.unlabeled_sets: names must be unique, not 'test'"):
            load_section(EvaluateConfig, write(tmp_path, {"evaluate": data}))
