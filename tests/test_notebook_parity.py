"""JupyterLab parity: each step notebook, run top to bottom by a notebook client started in notebooks/ (as JupyterLab
does), gives the same results as the pipeline run by DVC from the project root — a second run of every step, in a
copy of its own, so this is also the check that the pipeline gives the same results when run again; and JupyterLab
offers the project's kernel."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import nbformat
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from conftest import ROOT, make_project_copy, project_env

pytestmark = pytest.mark.pipeline
KERNEL = "mlops-template"
# Figures that measure the machine, not the data: they differ between any two runs.
MEASURED = re.compile(r"_per_s$|_ms$|memory_mb|_seconds$")


def stage_notebooks(project) -> list:
    """The step notebooks dvc.yaml runs, in pipeline order (their numbers)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    notebooks = [dep for stage in stages.values() for dep in stage["deps"] if dep.startswith("notebooks/0")]
    return sorted(notebooks)


def results(project) -> dict:
    """What the pipeline decided: the charter, the catalog's content hashes, the monitoring reference (but for the run
    it names) and every metric that does not time the machine."""
    reference = json.loads((project / "models/reference_stats.json").read_text())
    out = {
        "charter": json.loads((project / "data/charter.json").read_text()),
        "hashes": {
            name: t["sha256"] for name, t in json.loads((project / "data/catalog.json").read_text())["tables"].items()
        },
        "reference": {k: v for k, v in reference.items() if k != "run_id"},
    }
    for path in sorted((project / "metrics").glob("*.json")):
        out[path.name] = {k: v for k, v in json.loads(path.read_text()).items() if not MEASURED.search(k)}
    return out


def test_step_notebooks_run_from_the_notebooks_folder_with_the_pipeline_results(smoke_pipeline, tmp_path):
    project = make_project_copy(tmp_path / "project")  # a fresh copy: its own data, MLflow store and registry
    for notebook in stage_notebooks(project):
        nb = nbformat.read(project / notebook, as_version=4)
        assert nb.metadata.kernelspec.name == KERNEL
        client = NotebookClient(
            nb, kernel_name=KERNEL, timeout=900, resources={"metadata": {"path": str(project / "notebooks")}}
        )
        client.execute(env=project_env())  # the kernel gets no tracking URI an earlier test exported
    by_notebooks, by_pipeline = results(project), results(smoke_pipeline)
    assert by_notebooks.keys() == by_pipeline.keys()
    for name in by_pipeline:
        assert by_notebooks[name] == by_pipeline[name], f"{name} differs between JupyterLab and the pipeline"
    rows = (pd.read_parquet(p / "data/features/development.parquet") for p in (project, smoke_pipeline))
    pd.testing.assert_frame_equal(*rows)  # step 03's development rows
    runs = (json.loads((p / "models/candidate.json").read_text())["run_id"] for p in (project, smoke_pipeline))
    assert len(set(runs)) == 2  # the same results from a run of its own


def kernelspecs_when_ready(log_path, process, attempts=120) -> dict:
    """The server's kernelspecs, polled every half second (bounded). Jupyter Server prints its URL before it listens
    on the port, so a refused connection means "not yet"; an error if the server exits or never answers."""
    for _ in range(attempts):
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", log_path.read_text())
        if found:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{found.group(1)}/api/kernelspecs?token=t", timeout=30
                ) as reply:
                    return json.loads(reply.read())["kernelspecs"]
            except urllib.error.URLError as err:
                if not isinstance(err.reason, ConnectionRefusedError):
                    raise
        assert process.poll() is None, log_path.read_text()[-2000:]
        time.sleep(0.5)
    raise AssertionError(f"no answer after {attempts / 2:.0f} s: {log_path.read_text()[-2000:]}")


def test_make_lab_opens_jupyterlab_with_the_project_kernel(tmp_path):
    """The README's `make lab`, on loopback without a browser: its JupyterLab lists the kernel the notebooks name."""
    log_path = tmp_path / "lab.log"
    with log_path.open("w") as log:
        lab = subprocess.Popen(
            ["make", "-s", "lab", "LAB_ARGS=--no-browser --port=0 --IdentityProvider.token=t"],
            cwd=ROOT,
            env=project_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        specs = kernelspecs_when_ready(log_path, lab)
        assert KERNEL in specs and specs[KERNEL]["spec"]["language"] == "python"
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(30)
