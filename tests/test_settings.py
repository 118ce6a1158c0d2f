"""Settings that explain themselves: every environment variable distilops reads is declared once (name, type,
default, meaning), parsed through one path that refuses a bad value in one line, listed by `distilops settings`
and in docs/settings.md; the manifests set only declared names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distilops import settings
from distilops.cli import app, declared_settings
from distilops.errors import DistilopsError, SettingError
from distilops.serving import settings as service

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_MODULES = {ROOT / "src/distilops/settings.py", ROOT / "src/distilops/serving/settings.py"}


def test_every_name_is_declared_once():
    names = [s.name for s in declared_settings()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_the_code_reads_the_environment_only_through_the_declarations():
    """No module but the two declaring ones reads os.environ or getenv (writing, or passing the environment on
    to a child process, is no read)."""
    reads = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=[^=])|environ\.get\(")
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "src").rglob("*.py")) if path not in SETTINGS_MODULES
             for n, line in enumerate(path.read_text().splitlines(), start=1) if reads.search(line)]
    assert not found, "\n".join(found)
    assert reads.search('x = os.environ["DISTILOPS_CACHE"]') and reads.search('os.getenv("X")')  # the check sees one
    assert not reads.search('os.environ["X"] = value')


def test_the_docs_table_is_the_generated_one():
    generated = CliRunner().invoke(app, ["settings", "--markdown"]).stdout
    documented = [line for line in (ROOT / "docs/settings.md").read_text().splitlines() if line.startswith("|")]
    assert documented == generated.splitlines(), "regenerate it: distilops settings --markdown"
    assert len(documented) == 2 + len(declared_settings())


@pytest.mark.parametrize(("setting", "raw", "value"), [
    (service.REQUIRE_GPU, "1", True), (service.REQUIRE_GPU, "TRUE", True), (service.REQUIRE_GPU, "yes", True),
    (service.REQUIRE_GPU, "On", True), (service.REQUIRE_GPU, "0", False), (service.REQUIRE_GPU, "false", False),
    (service.REQUIRE_GPU, "no", False), (service.REQUIRE_GPU, "off", False), (service.REQUIRE_GPU, "", False),
    (service.WORKERS, " 4 ", 4), (service.THREADS, "0", 0), (service.MAX_WINDOWS, "", None),
    (service.MAX_WINDOWS, "8", 8), (service.SHADOW_RATE, "0", 0.0), (service.SHADOW_RATE, "1", 1.0),
    (service.DEAD_AFTER_SECONDS, "0.5", 0.5), (settings.EXPERIMENT, "", "distilops"),
])
def test_values_parse_to_their_type(setting, raw, value):
    assert setting.read({setting.name: raw}) == value
    assert type(setting.read({setting.name: raw})) is type(value)


@pytest.mark.parametrize(("setting", "raw", "kind"), [
    (service.REQUIRE_GPU, "maybe", "a boolean"), (service.REQUIRE_GPU, "2", "a boolean"),
    (service.WORKERS, "0", "a whole number >= 1"), (service.WORKERS, "-2", "a whole number >= 1"),
    (service.WORKERS, "1.5", "a whole number >= 1"), (service.MAX_LATENCY_MS, "fast", "a whole number >= 1"),
    (service.MAX_LATENCY_MS, "0", "a whole number >= 1"), (service.THREADS, "-1", "a whole number >= 0"),
    (service.MAX_WINDOWS, "0", "a whole number >= 1"), (service.CPU_LIMIT, "500m", "a whole number >= 1"),
    (service.UNREADY_AFTER_FAILURES, "0", "a whole number >= 1"),
    (service.DEAD_AFTER_SECONDS, "0", "a number of seconds > 0"),
    (service.DEAD_AFTER_SECONDS, "inf", "a number of seconds > 0"),
    (service.SHADOW_RATE, "1.5", "a fraction between 0 and 1"), (service.SHADOW_RATE, "nan", "a fraction"),
])
def test_a_bad_value_is_one_line_naming_it(setting, raw, kind):
    with pytest.raises(SettingError) as refused:
        setting.read({setting.name: raw})
    message = str(refused.value)
    assert isinstance(refused.value, DistilopsError) and "\n" not in message
    assert message.startswith(f"{setting.name}={raw!r}: must be {kind}")


def test_a_secret_is_never_printed():
    bad = settings.Setting("DISTILOPS_TEST_SECRET", 0, "a whole number >= 1", "x", settings.whole(1), secret=True)
    with pytest.raises(SettingError, match=r"DISTILOPS_TEST_SECRET=\(hidden\)") as refused:
        bad.read({"DISTILOPS_TEST_SECRET": "hunter2"})
    assert "hunter2" not in str(refused.value)
    result = CliRunner().invoke(app, ["settings"], env={"DISTILOPS_API_TOKEN": "s3cret-token",
                                                       "DISTILOPS_WORKERS": "3"})
    assert result.exit_code == 0 and "s3cret-token" not in result.output
    shown = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.output.splitlines()
             if line and not line.startswith(" ")}
    assert shown["DISTILOPS_API_TOKEN"].startswith("(set, hidden)") and shown["DISTILOPS_WORKERS"].startswith("3 ")
    assert shown["DISTILOPS_MAX_TEXTS"].startswith("64 (default)")


def test_the_settings_command_refuses_every_bad_value_in_one_line_each():
    result = CliRunner().invoke(app, ["settings"], env={"DISTILOPS_WORKERS": "0", "DISTILOPS_REQUIRE_GPU": "maybe"})
    assert result.exit_code == 1
    assert "error: DISTILOPS_WORKERS='0': must be a whole number >= 1" in result.output
    assert "DISTILOPS_REQUIRE_GPU='maybe': must be a boolean" in result.output
    assert "Traceback" not in result.output


def test_the_service_settings_read_every_declaration_into_its_field():
    read = service.read({"DISTILOPS_WORKERS": "2", "DISTILOPS_REQUIRE_GPU": "true", "DISTILOPS_SHADOW_RATE": "0.25"})
    assert (read.workers, read.require_gpu, read.shadow_rate, read.max_texts) == (2, True, 0.25, 64)
    assert {f"DISTILOPS_{name.upper()}" for name in vars(read)} == {s.name for s in service.ALL}
    with pytest.raises(SettingError) as refused:
        service.read({"DISTILOPS_WORKERS": "0", "DISTILOPS_DRIFT_WINDOW": "x"})
    assert str(refused.value).splitlines() == ["DISTILOPS_WORKERS='0': must be a whole number >= 1",
                                               "DISTILOPS_DRIFT_WINDOW='x': must be a whole number >= 1"]


# --- the manifests set only declared names ---------------------------------------------------------------------


def env_file_keys(path: Path) -> set[str]:
    return {line.split("=", 1)[0].strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")}


def config_map_keys() -> dict[str, set[str]]:
    """{where: keys} of every ConfigMap the kustomizations generate: env files and literals."""
    found: dict[str, set[str]] = {}
    for kustomization in sorted((ROOT / "k8s").rglob("kustomization.yaml")):
        for generator in (yaml.safe_load(kustomization.read_text()) or {}).get("configMapGenerator", []):
            where = f"{kustomization.relative_to(ROOT)} {generator['name']}"
            found[where] = {literal.split("=", 1)[0] for literal in generator.get("literals", [])}
            for env in generator.get("envs", []):
                found[where] |= env_file_keys(kustomization.parent / env)
    for env in [*(ROOT / "k8s").rglob("config.env"), *(ROOT / "k8s/platform").glob("*.env")]:
        found[str(env.relative_to(ROOT))] = env_file_keys(env)
    return found


def image_env_keys() -> dict[str, set[str]]:
    """{file: DISTILOPS_* names} each Containerfile or Dockerfile sets with ENV (the OS's, Python's and BentoML's
    own variables there are the image's business)."""
    found = {}
    for path in [*ROOT.joinpath("container").rglob("Containerfile*"), *ROOT.joinpath("k8s").rglob("Dockerfile*")]:
        text = path.read_text().replace("\\\n", " ")
        env = " ".join(line for line in text.splitlines() if line.startswith("ENV "))
        found[str(path.relative_to(ROOT))] = set(re.findall(r"\b(DISTILOPS_[A-Z0-9_]+)=", env))
    return found


def test_every_config_map_key_and_image_variable_is_a_declared_setting():
    declared = {s.name for s in declared_settings()}
    found = {**config_map_keys(), **image_env_keys()}
    assert "k8s/base/config.env" in found and "container/Containerfile" in found
    assert "DISTILOPS_MAX_LATENCY_MS" in found["k8s/base/config.env"]
    assert "DISTILOPS_BENTO_MODEL" in found["container/Containerfile"]
    assert any("MLFLOW_TRACKING_URI" in keys for keys in found.values())  # the jobs' literals are read
    unknown = {where: sorted(keys - declared) for where, keys in found.items() if keys - declared}
    assert not unknown, f"set but never declared (declare it in distilops/settings.py or drop it): {unknown}"


def test_the_key_check_sees_an_undeclared_key(tmp_path):
    (tmp_path / "config.env").write_text("# a comment\nDISTILOPS_DEVICE=cpu\nDISTILOPS_WORKERS=1\n")
    assert env_file_keys(tmp_path / "config.env") - {s.name for s in declared_settings()} == {"DISTILOPS_DEVICE"}
