"""The layout's rules (docs/architecture.md), checked on the code itself:

- one-way edges: serving imports only `errors` and `settings` of the core; the shared core imports only
  the core; pipeline and release import the core and serving, never each other (one named exception);
- the Bento carries the serving package whole, and it runs without torch, transformers or MLflow;
- every DVC stage depends on exactly the code it runs, so a serving edit reruns no training stage;
- the contracts the code and dvc.yaml share (paths, report keys, window defaults) agree.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "distilops"
CORE = {"errors", "config", "paths", "hashing", "logs", "stats", "tracking", "stage", "commands", "settings"}
ENTRY_POINTS = {"distilops.cli"}  # the `distilops` command: any command may need any part (imported lazily)
# Files a module hands to a framework instead of importing: MLflow runs pyfunc_model.py from the path pyfunc.py logs.
USED_WITHOUT_IMPORT = {"distilops.release.pyfunc": ["distilops.release.pyfunc_model"]}
# MLflow loading a registered PyTorch version (the fp32 student) needs the pipeline's torch runtime.
ALLOWED_EXCEPTIONS = {("distilops.release.pyfunc_model", "distilops.pipeline.torch_model")}
# The core modules serving may import (and the Bento carries): its errors, and how settings are read.
SERVING_CORE = {"distilops.errors", "distilops.settings"}
TRAINING_STAGES = {"prepare", "long_texts", "teacher", "teacher_outputs", "distill"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The distilops modules a file imports, at any depth of the file (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distilops":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "distilops")
    return {name for name in found if module_file(name)}


def with_packages(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def code_closure(script: Path) -> set[str]:
    """Every distilops file a script runs: its imports, theirs, and so on, package __init__ files included."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for name in imported_modules(todo.pop()):
            for module in [m for imported in [name, *USED_WITHOUT_IMPORT.get(name, [])]
                           for m in with_packages(imported)]:
                if module not in seen:
                    seen.add(module)
                    todo.append(module_file(module))
    return {module_file(m).relative_to(ROOT).as_posix() for m in seen}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1] if parts[1] in ("serving", "pipeline", "release") else ("core" if parts[1] in CORE else parts[1])


ALLOWED = {"root": set(), "core": {"root", "core"}, "serving": {"root", "serving"},
           "pipeline": {"root", "core", "serving", "pipeline"}, "release": {"root", "core", "serving", "release"}}


def test_every_module_belongs_to_a_layer():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - ENTRY_POINTS
    assert {layer(m) for m in modules} <= set(ALLOWED), sorted(m for m in modules if layer(m) not in ALLOWED)


def test_imports_follow_the_one_way_edges():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module in ENTRY_POINTS:
            continue
        for imported in imported_modules(path):
            target = layer(imported)
            if imported in SERVING_CORE:  # the core modules serving imports: every layer may
                continue
            if target not in ALLOWED[layer(module)] and (module, imported) not in ALLOWED_EXCEPTIONS:
                broken.append(f"{module} ({layer(module)}) imports {imported} ({target})")
    assert not broken, "\n".join(broken)


def test_the_rule_checker_sees_a_broken_edge(tmp_path):
    """The checker itself: an import from serving into the pipeline is found, lazy or not."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from distilops.pipeline.training import train\n")
    assert "distilops.pipeline.training" in imported_modules(probe)
    assert layer("distilops.pipeline.training") not in ALLOWED["serving"]


def third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found - {"distilops", "__future__"} - set(sys.stdlib_module_names)


def test_serving_imports_only_what_the_serving_image_holds():
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    packages = {p.split("=")[0].split(">")[0].split("<")[0].split("[")[0] for p in bentofile["python"]["packages"]}
    # what those packages are imported as, and what they bring with them (BentoML: pydantic, starlette,
    # prometheus_client)
    brought = {"pydantic", "starlette", "prometheus_client"}
    importable = (packages - {"opentelemetry-api", "opentelemetry-sdk"}) | brought
    used = set().union(*(third_party_imports(p) for p in (PACKAGE / "serving").glob("*.py")))
    assert used <= importable, f"not in the serving image: {used - importable}"


def test_the_serving_package_runs_without_torch_transformers_or_mlflow():
    probe = ("import sys, distilops.serving.folder, distilops.serving.inference; "
             "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'sklearn', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_bento_carries_the_serving_package_as_a_folder():
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["service"] == "distilops.serving.service:Classifier"
    included = set(bentofile["include"])
    assert "distilops/serving/" in included
    needed = code_closure(PACKAGE / "serving" / "service.py") | {"src/distilops/serving/service.py"}
    covered = {f"src/{p}" for p in included if not p.endswith("/")}
    folders = [f"src/{p}" for p in included if p.endswith("/")]
    assert all(path in covered or any(path.startswith(f) for f in folders) for path in needed)
    assert covered == {"src/distilops/__init__.py", *(f"src/{m.replace('.', '/')}.py" for m in SERVING_CORE)}


def test_every_stage_depends_on_all_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {p.stem for p in (ROOT / "stages").glob("[!_]*.py")}  # _preflight.py is no stage
    for name, stage in stages.items():
        declared = {d for d in stage["deps"] if d.startswith("src/")}
        needed = code_closure(ROOT / "stages" / f"{name}.py")
        assert f"stages/{name}.py" in stage["deps"]
        assert declared == needed, (f"dvc.yaml stage '{name}': missing {sorted(needed - declared)}, "
                                    f"not used {sorted(declared - needed)}")


def test_every_stage_imports_the_preflight_first_and_a_python_without_the_project_gets_one_line():
    """DVC runs `python stages/<name>.py` with the first `python` on the PATH: outside the venv, one that lacks the
    project. Each script imports _preflight before anything else, so that is one line naming the fix."""
    for script in sorted((ROOT / "stages").glob("[!_]*.py")):
        first = next(n for n in ast.parse(script.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom)))
        assert isinstance(first, ast.Import) and first.names[0].name == "_preflight", script.name
    # -S: no site-packages, as a system Python without the project's packages
    bare = subprocess.run([sys.executable, "-S", "stages/distill.py"], cwd=ROOT, capture_output=True, text=True)
    assert bare.returncode == 1 and "Traceback" not in bare.stderr
    (line,) = bare.stderr.strip().splitlines()
    assert line.startswith("distill: error: No module named ") and ". .venv/bin/activate" in line


def test_the_closure_follows_imports_of_imports_and_framework_files():
    closure = code_closure(ROOT / "stages" / "distill.py")
    assert "src/distilops/pipeline/losses.py" in closure  # distill.py -> tuning.py -> losses.py
    assert "src/distilops/pipeline/__init__.py" in closure  # package __init__ files run too
    register = code_closure(ROOT / "stages" / "register.py")
    assert "src/distilops/release/pyfunc_model.py" in register  # logged by pyfunc.py, run by MLflow


def test_no_training_stage_depends_on_serving_inference_or_the_service():
    """What a serving edit reruns: the model-folder format is the contract both sides share (an edit there
    reruns its writers too); inference and the service are serving's alone."""
    serving_only = {"src/distilops/serving/inference.py", "src/distilops/serving/live.py",
                    "src/distilops/serving/service.py"}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in TRAINING_STAGES:
        assert not serving_only & set(stages[name]["deps"]), name
    assert "src/distilops/serving/inference.py" in stages["quantize"]["deps"]


@pytest.mark.slow
def test_dvc_status_after_a_serving_edit_lists_no_training_stage(tmp_path):
    """The real `dvc status` on this repository's dvc.lock: edit serving/inference.py and service.py, and
    only stages that serve (quantize, evaluate, register) name them as changed."""
    from conftest import RepoCopy

    repo = RepoCopy(tmp_path / "repo")
    (repo.path / "dvc.lock").write_text((ROOT / "dvc.lock").read_text())
    for edited in ("src/distilops/serving/inference.py", "src/distilops/serving/service.py"):
        path = repo.path / edited
        path.write_text(path.read_text() + "\n# an edit\n")
    status = json.loads(repo.dvc("status", "--json").stdout)
    naming = {stage for stage, changes in status.items() for change in changes
              if isinstance(change, dict) for modified in change.get("changed deps", {})
              if modified.startswith("src/distilops/serving/")}
    assert naming and naming <= {"quantize", "evaluate", "register"}, status


def test_the_committed_lock_matches_the_code_and_params():
    """dvc.lock records what the committed outputs were made from: every code dependency's hash and every
    param a stage reads. A code or params edit committed without `dvc repro` (or, for an edit that changes no
    output, `dvc commit`) would leave the lock describing code that no longer exists; this fails instead."""
    import hashlib

    def plain(value: object) -> object:  # DVC writes 5e-05 as a string; PyYAML reads 5.0e-5 as a float
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stale = []
    for name, stage in lock.items():
        for dep in stage.get("deps", []):
            path = ROOT / dep["path"]
            code = path.is_file() and dep["path"].startswith(("src/", "stages/"))
            if code and hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:  # noqa: S324 (DVC's own hash)
                stale.append(f"{name}: {dep['path']}")
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            if plain(params.get(key)) != plain(value):
                stale.append(f"{name}: params {key}")
    assert not stale, "dvc.lock is stale (run `dvc repro`): " + ", ".join(stale)


def test_paths_and_dvc_yaml_agree():
    """Every path the code reads a stage's output from is that stage's declared output (or inside one)."""
    from distilops import paths

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values()
            for kind in ("outs", "metrics", "plots") for o in s.get(kind, [])}
    for constant in (paths.DATA_REPORT, paths.LONG_TEXTS, paths.TEACHER, paths.TEACHER_OUTPUTS, paths.STUDENT,
                     paths.QUANTIZED, paths.TEACHER_ONNX):
        assert constant.as_posix() in outs, constant
    assert {f"{paths.PREPARED.as_posix()}/{split}.parquet" for split in ("train", "validation", "test")} <= outs
    for name, stage in stages.items():  # a stage's metrics files are metrics/<stage>.json and metrics/<stage>_*.json
        written = [next(iter(o)) if isinstance(o, dict) else o for kind in ("outs", "metrics")
                   for o in stage.get(kind, [])]
        assert all(out == paths.metrics_file(name).as_posix() or out.startswith(f"metrics/{name}_")
                   for out in written if out.startswith("metrics/")), name


def test_dvc_plot_keys_name_the_served_model_as_evaluate_names_it():
    from distilops.config import RegisterConfig
    from distilops.pipeline.evaluate import model_key

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    keys = {column for plot in plots if isinstance(plot, dict) for spec in plot.values()
            if isinstance(spec, dict) and isinstance(spec.get("y"), dict) for column in spec["y"].values()}
    assert model_key(RegisterConfig().serving.cpu) in keys and model_key("teacher") in keys


def test_window_defaults_have_one_value():
    """What params.yaml defaults to and what a folder recording no windows is read with."""
    from distilops.config import EvaluateConfig
    from distilops.serving import folder

    fields = EvaluateConfig.model_fields
    assert (fields["window_overlap"].default, fields["max_windows"].default) == (folder.WINDOW_OVERLAP,
                                                                                 folder.MAX_WINDOWS)
