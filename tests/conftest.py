"""Shared fixtures: the project root, and disposable copies of the project for end-to-end runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lib.core import load_yaml, merge_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a copy of the project leaves out: environments, stores, DVC caches and every stage output.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "mlflow.db", "mlartifacts", "cache", "tmp", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", "*.egg-info", "artifacts", "results.json")
OUTPUT_DIRS = ("data", "models", "metrics", "plots", "reports")


def project_env(extra=None) -> dict:
    """The environment of this process with the project's virtual environment first on PATH, and without the MLflow tracking
    URI a test may have exported (MLflow's `set_tracking_uri` does): a project copy uses its own store unless `extra` names one."""
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def run(cmd, cwd, check=True, env=None, timeout=1800):
    """Run `cmd` with the project's environment first on PATH; returns the CompletedProcess."""
    full_env = project_env(env)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_project_copy(dest: Path, overlay: Path = ROOT / "tests/smoke/params.yaml") -> Path:
    """A fresh git + DVC working copy of the project at `dest`, without outputs, running on params.yaml with `overlay` merged
    over it (the smoke slice by default; None: params.yaml as it is)."""
    shutil.copytree(ROOT, dest, ignore=NOT_COPIED)
    for folder in OUTPUT_DIRS:
        for path in (dest / folder).glob("*") if (dest / folder).exists() else []:
            if path.name != ".gitignore": shutil.rmtree(path) if path.is_dir() else path.unlink()
    (dest / "dvc.lock").unlink(missing_ok=True)
    if overlay is not None:
        merged = merge_params(load_yaml(ROOT / "params.yaml"), load_yaml(overlay), where=Path(overlay).name)
        (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm copy", dest)
    return dest


@pytest.fixture
def project_copy(tmp_path):
    return make_project_copy(tmp_path / "project")


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory):
    """One smoke run of the whole pipeline, shared by the tests that only read its outputs."""
    project = make_project_copy(tmp_path_factory.mktemp("smoke") / "project")
    run(["dvc", "repro"], project)
    return project
