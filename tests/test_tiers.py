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

from conftest import LONGEST_FIRST, TIERS, build_once, exclusive, run, start_rank, wait_until

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


def test_the_pipeline_tier_starts_its_longest_files_first(request, tmp_path):
    """Every file LONGEST_FIRST names holds pipeline tests (a renamed file would silently start last), and the tier
    hands files to its workers in collection order, which puts them first."""
    marked_files = {nodeid.split("::")[0].split("/")[-1] for nodeid in tier_record(request.config, tmp_path)["marked"]}
    assert not set(LONGEST_FIRST) - marked_files, "LONGEST_FIRST names files without pipeline tests"
    ranks = [start_rank(item) for item in request.session.items]
    assert ranks == sorted(ranks), "collection does not start with the longest files"
    pytest_lines = re.findall(r"^pytest -m .*$", (TESTS / "run_all.sh").read_text(), re.MULTILINE)
    assert len(pytest_lines) == 2, pytest_lines  # the fast tier's and the pipeline tier's
    assert all("--no-loadscope-reorder" in line for line in pytest_lines)  # else pytest-xdist reorders by test count


def test_both_tiers_let_an_openmp_thread_that_waits_sleep():
    """Tests run side by side on few cores: an OpenMP thread that spins while it waits for work (scikit-learn's
    boosting) takes a core another test needs. The tiers export OMP_WAIT_POLICY=PASSIVE before anything runs."""
    script = (TESTS / "run_all.sh").read_text()
    export = re.search(r"^export OMP_WAIT_POLICY=.*$", script, re.MULTILINE)
    assert export and export.start() < script.index("ruff check"), "no OMP_WAIT_POLICY export before the tiers run"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    shell = subprocess.run(["bash", "-c", f"{export.group(0)}; echo $OMP_WAIT_POLICY"], env=env, capture_output=True)
    assert shell.stdout.decode().strip() == "PASSIVE"


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


def _count_build(folder):
    (folder / "part").write_text("built")
    with open(folder.parent / "builds", "a") as builds:
        builds.write("1")


def test_the_shared_smoke_run_is_built_once_and_a_failed_build_starts_again(tmp_path):
    """`build_once` (the smoke run every xdist worker shares): a second call reuses the build; after a failure the
    next call builds again from an empty folder."""

    def fail(folder):
        (folder / "half").write_text("left by a failed build")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        build_once(tmp_path / "smoke", fail)
    build_once(tmp_path / "smoke", _count_build)
    build_once(tmp_path / "smoke", _count_build)
    assert (tmp_path / "builds").read_text() == "1"
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == [".built", "part"]


def _waits_on_a_lock(pid) -> bool:
    """Whether process `pid` is blocked waiting for a file lock (a `->` line of /proc/locks)."""
    lines = Path("/proc/locks").read_text().splitlines()
    return any(p[1] == "->" and p[5] == str(pid) for p in (line.split() for line in lines) if len(p) > 5)


def test_a_worker_asking_for_the_smoke_run_while_another_builds_it_waits_and_reuses_it(tmp_path):
    """While one process holds the build, a second `build_once` waits on the lock and then finds the build done."""
    waiter = "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import test_tiers as t; "
    waiter += "t.build_once(Path(sys.argv[2]), t._count_build)"
    with exclusive(tmp_path / "smoke.lock"):  # this process is "building"
        second = subprocess.Popen([sys.executable, "-c", waiter, str(TESTS), str(tmp_path / "smoke")])
        wait_until(
            "the second process to wait on the lock of the build in progress",
            lambda: _waits_on_a_lock(second.pid),
            timeout=120,
            processes=[second],
        )
        (tmp_path / "smoke").mkdir()
        (tmp_path / "smoke" / ".built").touch()  # the build completes while the lock is held
    assert second.wait(timeout=120) == 0
    assert not (tmp_path / "builds").exists(), "the second process built again instead of reusing the build"
