"""After a failed stage, one command (`make recover`, which runs `recover-pipeline`) restores the last good state —
DVC outputs from the cache, uncached metrics and pointers from git — and keeps the failed executed notebook under
reports/failed/, where it does not block `dvc checkout`. Shown on a one-stage DVC project of the same shape."""

import json

import pytest
import yaml

from conftest import ROOT, run

pytestmark = pytest.mark.pipeline

STAGE_SCRIPT = """import pathlib, sys, yaml
value = yaml.safe_load(open("params.yaml"))["demo"]["value"]
outputs = {"data/out.txt": f"out {value}", "metrics/demo.json": f'{{"value": {value}}}',
           "models/pointer.json": f'{{"version": {value}}}', "reports/executed/01_demo.ipynb": f"notebook {value}"}
for path, text in outputs.items():
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text)
sys.exit(1 if value < 0 else 0)  # a negative value: the stage fails after writing every output
"""
PIPELINE = {
    "stages": {
        "demo": {
            "cmd": "python write.py",
            "deps": ["write.py"],
            "params": ["demo"],
            "outs": ["data/out.txt", "reports/executed/01_demo.ipynb", {"models/pointer.json": {"cache": False}}],
            "metrics": [{"metrics/demo.json": {"cache": False}}],
        }
    }
}


@pytest.fixture
def failed_project(tmp_path):
    """A committed good run of a one-stage project, then a run of the stage that failed halfway through its outputs."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "write.py").write_text(STAGE_SCRIPT)
    (project / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE))
    (project / "params.yaml").write_text("demo: {value: 1}\n")
    run("git init -q && dvc init -q && dvc repro -q", project)
    run("git add -A && git -c user.name=t -c user.email=t@t commit -qm 'good run'", project)
    (project / "params.yaml").write_text("demo: {value: -1}\n")
    assert run(["dvc", "repro"], project, check=False).returncode != 0
    assert run(["dvc", "checkout"], project, check=False).returncode != 0  # the failed notebook blocks it
    return project


def test_recover_restores_the_last_good_outputs_and_keeps_the_failed_notebook_aside(failed_project):
    proc = run(["recover-pipeline"], failed_project)
    assert (failed_project / "data/out.txt").read_text() == "out 1"
    assert json.loads((failed_project / "metrics/demo.json").read_text()) == {"value": 1}
    assert json.loads((failed_project / "models/pointer.json").read_text()) == {"version": 1}
    assert (failed_project / "reports/executed/01_demo.ipynb").read_text() == "notebook 1"
    kept = list((failed_project / "reports/failed").glob("01_demo-*.ipynb"))
    assert len(kept) == 1 and kept[0].read_text() == "notebook -1", proc.stdout
    assert "reports/failed/" in proc.stdout
    run(["dvc", "checkout"], failed_project)  # nothing blocks a plain checkout any more
    status = json.loads(run(["dvc", "status", "--json"], failed_project).stdout)
    assert status == {"demo": [{"changed deps": {"params.yaml": {"demo": "modified"}}}]}  # only the params edit is left


def test_make_recover_is_the_documented_command():
    assert "recover-pipeline" in (ROOT / "Makefile").read_text().split("\nrecover:")[1].split("\n\n")[0]
    readme = (ROOT / "README.md").read_text()
    assert "## When a run fails" in readme and "make recover" in readme.split("## When a run fails")[1]
