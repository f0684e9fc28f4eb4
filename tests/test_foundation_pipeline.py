"""Step 01 end to end through DVC and papermill in disposable copies of the project, and the stage's faults."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import yaml

from conftest import BIN, project_env, run, wait_until
from lib.core import tracking_uri
from lib.kpis import validate_charter

pytestmark = pytest.mark.pipeline
STAGE = "business_understanding"
NOTEBOOK = "notebooks/01_business_understanding.ipynb"


def insert_cell(project, source, before="save_json(charter"):
    """Insert a run cell (`#| stage`: a stage run executes it) into the copy's step-01 notebook, just before the cell
    containing `before`."""
    path = project / NOTEBOOK
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if before in c.source)
    nb.cells.insert(at, nbformat.v4.new_code_cell(f"#| stage\n{source}"))
    nbformat.write(nb, path)
    run("git -c user.name=t -c user.email=t@t commit -qam 'change notebook'", project)


def insert_waiting_cell(project, signals):
    """Insert a cell that writes `signals/started` and then waits (bounded) until the test writes `signals/release`:
    the test sees when the stage is running and decides when it goes on. Returns the two paths."""
    signals.mkdir()
    started, release = signals / "started", signals / "release"
    insert_cell(
        project,
        f"""import pathlib, time
pathlib.Path({str(started)!r}).touch()
deadline = time.monotonic() + 300
while not pathlib.Path({str(release)!r}).exists():
    assert time.monotonic() < deadline, "no release signal within 300 s"
    time.sleep(0.1)""",
    )
    return started, release


def wait_for_file(path, process, log, timeout=300):
    """Return once `path` exists; fail if `process` exits first or the deadline passes."""
    wait_until(path.name, path.exists, timeout, [process], lambda: log.read_text()[-4000:])


def stop(process):
    """Stop `process` and its process group if it is still running."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def locked_stages(project):
    lock = project / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


def test_stage_writes_the_validated_charter_and_a_second_repro_does_nothing(project_copy):
    run(["dvc", "repro", STAGE], project_copy)
    charter = json.loads((project_copy / "data/charter.json").read_text())
    expected = yaml.safe_load((project_copy / "charter.yaml").read_text())
    assert charter == validate_charter(expected)
    assert {k["id"] for k in charter["kpis"]} >= {"store_visit_rate_14d", "redemption_rate", "offer_precision"}
    page = (project_copy / "reports/html/01_business_understanding.html").read_text()
    assert "Key performance indicators" in page and "validate_charter(" not in page and "Traceback" not in page
    assert STAGE in locked_stages(project_copy)
    again = run(["dvc", "repro", STAGE], project_copy)
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout
    assert "up to date" in run(["dvc", "status", STAGE], project_copy).stdout


@pytest.mark.parametrize("cwd", ["notebooks", "."])
def test_notebook_runs_from_the_notebooks_folder_and_from_the_root(project_copy, cwd, tmp_path):
    out = tmp_path / "executed.ipynb"
    run(
        [
            "papermill",
            NOTEBOOK if cwd == "." else NOTEBOOK.split("/")[1],
            str(out),
            "-k",
            "mlops-template",
            "-p",
            "params_file",
            "params.yaml",
        ],
        project_copy / cwd,
    )
    charter = json.loads((project_copy / "data/charter.json").read_text())
    assert charter["title"] == yaml.safe_load((project_copy / "charter.yaml").read_text())["title"]


def test_a_failing_cell_fails_the_stage_and_keeps_the_executed_notebook(project_copy):
    insert_cell(project_copy, "raise RuntimeError('charter source unavailable')")
    proc = run(["dvc", "repro", STAGE], project_copy, check=False)
    assert proc.returncode != 0
    assert "stage 'business_understanding' failed" in proc.stderr and "charter source unavailable" in proc.stderr
    assert (project_copy / "reports/executed/01_business_understanding.ipynb").stat().st_size > 0
    assert STAGE not in locked_stages(project_copy)


def test_the_mlflow_runs_of_a_failed_stage_end_failed_not_finished(project_copy):
    """A run that finished before a later cell failed, and one left open, both end FAILED: nothing of a stage that did
    not complete reads as a finished run."""
    insert_cell(
        project_copy,
        """import os
import mlflow
from lib.core import connect_mlflow
connect_mlflow(root, os.environ, "failing")  # its first call creates the experiment without activating it
with mlflow.start_run(run_name="done before the failure"):
    pass
mlflow.start_run(run_name="open at the failure")
raise RuntimeError("charter source unavailable")""",
    )
    proc = run(["dvc", "repro", STAGE], project_copy, check=False)
    assert proc.returncode != 0 and "charter source unavailable" in proc.stderr
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(project_copy, {}))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"], proc.stderr[-3000:]
    assert len({r.data.tags["stage_run"] for r in runs}) == 1


def test_an_early_exit_with_status_0_still_fails_the_stage(project_copy):
    insert_cell(project_copy, "import sys\nsys.exit(0)")
    proc = run(["dvc", "repro", STAGE], project_copy, check=False)
    assert proc.returncode != 0
    assert "missing or empty output(s): data/charter.json" in proc.stderr
    assert STAGE not in locked_stages(project_copy)


def test_a_hung_cell_is_stopped_by_the_cell_timeout(project_copy):
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["shared"]["cell_timeout_s"] = 5
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    insert_cell(project_copy, "import time\ntime.sleep(120)")
    started = time.monotonic()
    proc = run(["dvc", "repro", STAGE], project_copy, check=False)
    assert proc.returncode != 0 and "cell_timeout_s" in proc.stderr
    assert time.monotonic() - started < 100


def test_a_wrongly_typed_parameter_stops_the_stage_naming_the_key(project_copy):
    charter = yaml.safe_load((project_copy / "charter.yaml").read_text())
    charter["kpis"][0]["target"] = "ninety percent"
    (project_copy / "charter.yaml").write_text(yaml.safe_dump(charter, sort_keys=False))
    proc = run(["dvc", "repro", STAGE], project_copy, check=False)
    assert proc.returncode != 0 and "business_understanding.kpis[0].target: expected int or float" in proc.stderr
    assert not (project_copy / "data/charter.json").exists()


def test_the_environment_s_own_dvc_runs_the_pipeline_without_activating_it(project_copy):
    """`.venv/bin/dvc repro`, as the README allows, finds `run-stage` although the environment is not on PATH."""
    (project_copy / ".venv").symlink_to(BIN.parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env = {**project_env(), "PATH": path}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        [".venv/bin/dvc", "repro", STAGE], cwd=project_copy, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert STAGE in locked_stages(project_copy)


def start_repro(project, log):
    """`dvc repro` of the stage in the background, in a session of its own, its output going to `log`."""
    with log.open("w") as out:
        process = subprocess.Popen(
            ["dvc", "repro", STAGE],
            cwd=project,
            env=project_env(),
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, log


def test_two_repros_at_once_do_not_both_run(project_copy, tmp_path):
    started, release = insert_waiting_cell(project_copy, tmp_path / "signals")
    first, log = start_repro(project_copy, tmp_path / "first.log")
    try:
        wait_for_file(started, first, log)  # the first repro is inside the stage, holding its lock
        second = run(["dvc", "repro", STAGE], project_copy, check=False, timeout=120)
        release.touch()
        assert first.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        release.touch()
        stop(first)
    assert second.returncode != 0 and "lock" in second.stderr.lower()
    assert json.loads((project_copy / "data/charter.json").read_text())["kpis"]


def test_an_interrupted_repro_is_recovered_by_the_next_one(project_copy, tmp_path):
    started, release = insert_waiting_cell(project_copy, tmp_path / "signals")
    first, log = start_repro(project_copy, tmp_path / "first.log")
    try:
        wait_for_file(started, first, log)  # the stage is running: interrupt it there
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=60)
    finally:
        release.touch()  # a kernel that outlived the interrupt stops waiting
        stop(first)
    assert first.returncode != 0
    assert STAGE not in locked_stages(project_copy)
    nb = nbformat.read(project_copy / NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if str(started) not in c.source]
    nbformat.write(nb, project_copy / NOTEBOOK)
    run(["dvc", "repro", STAGE], project_copy)
    assert STAGE in locked_stages(project_copy) and json.loads((project_copy / "data/charter.json").read_text())["kpis"]


def insert_cell_with_a_running_mlflow_run(project, signals):
    """Insert a cell that starts an MLflow run, writes its id to `signals/started` and waits (bounded) for
    `signals/release`, as a long cell of a tracked stage does. Returns the two paths."""
    signals.mkdir()
    started, release = signals / "started", signals / "release"
    insert_cell(
        project,
        f"""import os, pathlib, time
import mlflow
from lib.core import connect_mlflow
connect_mlflow(root, os.environ, "interrupted")
tracked = mlflow.start_run(run_name="interrupted")
pathlib.Path({str(started)!r}).write_text(tracked.info.run_id)
deadline = time.monotonic() + 300
while not pathlib.Path({str(release)!r}).exists():
    assert time.monotonic() < deadline, "no release signal within 300 s"
    time.sleep(0.1)""",
    )
    return started, release


def _ended(process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # ended, waiting for its new parent to reap it
    except psutil.NoSuchProcess:
        return True


def _describe(process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return f"pid {process.pid}"


def still_running(processes, timeout=30) -> list:
    """Wait (bounded) until every process of `processes` has ended; returns a description of those still running."""
    deadline = time.monotonic() + timeout
    while not all(_ended(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)  # the poll interval of a bounded wait
    return [_describe(p) for p in processes if not _ended(p)]


# How the pipeline is stopped: Ctrl-C in a terminal signals the whole foreground process group; `kill` and `kill -9`
# signal the `dvc` process alone (DVC ignores SIGINT while a stage runs), or the whole group.
STOPS = {
    "ctrl-c": (signal.SIGINT, True),
    "kill": (signal.SIGTERM, False),
    "kill -9": (signal.SIGKILL, False),
    "kill -9 of the group": (signal.SIGKILL, True),
}


@pytest.mark.parametrize("how", STOPS)
def test_a_killed_repro_leaves_no_stage_process_and_no_running_mlflow_run(project_copy, tmp_path, how):
    import mlflow

    sig, whole_group = STOPS[how]
    started, release = insert_cell_with_a_running_mlflow_run(project_copy, tmp_path / "signals")
    first, log = start_repro(project_copy, tmp_path / "first.log")
    stage_processes = []
    try:
        wait_for_file(started, first, log)  # the stage is inside its long cell, with an MLflow run open
        stage_processes = psutil.Process(first.pid).children(recursive=True)  # run-stage, its kernel, ...
        assert any("run-stage" in _describe(p) for p in stage_processes)
        os.killpg(first.pid, sig) if whole_group else os.kill(first.pid, sig)
        alive = still_running(stage_processes)
        first.wait(timeout=60)
    finally:
        release.touch()  # a kernel that outlived the stop stops waiting ...
        for process in stage_processes:  # ... and whatever is left is stopped here, not left to the machine
            if not _ended(process):
                process.kill()
        stop(first)
    assert alive == [], f"still running 30 s after {how} of dvc repro: {alive}"
    assert STAGE not in locked_stages(project_copy)
    status = mlflow.MlflowClient(tracking_uri(project_copy, {})).get_run(started.read_text()).info.status
    assert status in ("KILLED", "FAILED"), f"the interrupted stage's MLflow run is {status}"
