"""The two test tiers: every test that needs a pipeline run (a project copy, the smoke pipeline, `dvc repro`, papermill,
`make lab`, an MLflow model server) is marked `pipeline`, so that `make test-fast` (`pytest -m "not pipeline"`) runs
none."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import TIERS, run

TESTS = Path(__file__).parent


def tier_record(config, tmp_path) -> dict:
    """What conftest recorded at collection: this session's record when it collected every test module, else the record
    of a collection of the whole tests/ folder."""
    record = config.stash.get(TIERS, None)
    if record and {str(p) for p in TESTS.glob("test_*.py")} <= set(record["modules"]):
        return record
    report = tmp_path / "tiers.json"
    run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(TESTS)],
        TESTS.parent,
        env={"PIPELINE_TIER_REPORT": str(report)},
    )
    return json.loads(report.read_text())


def test_every_test_that_needs_a_pipeline_run_is_marked(request, tmp_path):
    record = tier_record(request.config, tmp_path)
    assert record["needs"], "the check recognizes no pipeline test at all: conftest.pipeline_needs is broken"
    unmarked = {nodeid: reasons for nodeid, reasons in record["needs"].items() if nodeid not in record["marked"]}
    assert not unmarked, (
        "mark these @pytest.mark.pipeline (or the module with pytestmark = pytest.mark.pipeline):\n"
        + "\n".join(f"{nodeid}: {'; '.join(reasons)}" for nodeid, reasons in sorted(unmarked.items()))
    )


def fast_tier_nbdev_test() -> list:
    "The nbdev-test command line of the fast tier (tests/run_all.sh)."
    line = re.search(r"^nbdev-test\b[^>&|]*", (TESTS / "run_all.sh").read_text(), re.MULTILINE)
    assert line, "tests/run_all.sh runs no nbdev-test"
    return shlex.split(line.group(0))


def test_the_fast_tier_s_nbdev_test_ends_with_the_notebooks_not_with_idle_joblib_workers(tmp_path):
    """A demonstration that shares an array with joblib workers, as step 03's parallel search does, leaves idle workers
    behind; the fast tier's nbdev-test must end when the notebook does, not wait for them to time out (300 s, far beyond
    the timeout here)."""
    (tmp_path / "pyproject.toml").write_text('[tool.nbdev]\nnbs_path = "nbs"\n')
    (tmp_path / "nbs").mkdir()
    code = (
        "import numpy as np\nfrom joblib import Parallel, delayed\n\n"
        "shared = np.zeros(1_000_000)  # large enough to be memory-mapped to the workers\n"
        "assert Parallel(n_jobs=2)(delayed(np.sum)(shared) for _ in range(4)) == [0.0] * 4"
    )
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbformat.write(notebook, tmp_path / "nbs/workers.ipynb")
    proc = run([*fast_tier_nbdev_test(), "nbs/workers.ipynb"], tmp_path, timeout=150)
    assert "Success." in proc.stdout


@pytest.mark.parametrize("failing", ["nbdev-test", "unit tier"])
def test_the_fast_tier_fails_when_either_of_its_side_by_side_parts_fails(tmp_path, failing):
    """nbdev-test runs in the background beside the unit tier: a failure of either still fails the tier, and its
    output is shown."""
    tools = tmp_path / "bin"
    tools.mkdir()
    fails = {"nbdev-test": "nbdev-test*", "unit tier": '*"not pipeline"*'}[failing]
    for tool in ("ruff", "pytest", "nbdev-test"):
        (tools / tool).write_text(f'#!/bin/sh\necho {tool} said $*\ncase "{tool} $*" in {fails}) exit 1;; esac\n')
        (tools / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(TESTS / "run_all.sh"), "fast"], env=env, capture_output=True, text=True, timeout=300
    )  # stand-in tools: seconds
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pytest said -m not pipeline" in proc.stdout and "nbdev-test said --n-workers 0" in proc.stdout
    assert "fast tier passed" not in proc.stdout
