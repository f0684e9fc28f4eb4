"""The engineer's DVC workflow on a smoke run of the pipeline: metrics, plots, an experiment with one parameter
changed."""

import json
import shutil

import pytest
import yaml

from conftest import run

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def committed_copy(smoke_pipeline, tmp_path_factory):
    """The smoke run copied, with its dvc.lock committed: the baseline that experiments and diffs compare with."""
    project = tmp_path_factory.mktemp("workflow") / "project"
    shutil.copytree(smoke_pipeline, project, symlinks=True)
    run("git add -A && git -c user.name=t -c user.email=t@t commit -qm 'smoke run'", project)
    return project


def test_metrics_show_lists_every_metrics_file(committed_copy):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], committed_copy).stdout)
    files = next(iter(shown.values()))["data"]
    declared = {
        next(iter(m))
        for s in yaml.safe_load((committed_copy / "dvc.yaml").read_text())["stages"].values()
        for m in s.get("metrics", [])
    }
    assert declared <= set(files) and len(declared) == 6
    assert files["metrics/model_development.json"]["data"]["rows.train"] > 0


def test_plots_show_renders_the_declared_plots(committed_copy):
    run(["dvc", "plots", "show", "--out", "dvc_plots"], committed_copy)
    page = (committed_copy / "dvc_plots/index.html").read_text()
    for plot in (
        "plots/model_development/roc",
        "plots/model_development/precision_recall",
        "plots/monitoring_timeline.csv",
    ):
        assert plot in page


def test_an_experiment_with_one_parameter_changed_shows_in_exp_show_and_metrics_diff(committed_copy):
    run(
        [
            "dvc",
            "exp",
            "run",
            "-n",
            "lenient",
            "-S",
            "model_monitoring.min_households=1",
            "-S",
            "model_monitoring.min_rows=1",
        ],
        committed_copy,
    )
    experiments = json.loads(run(["dvc", "exp", "show", "--json"], committed_copy).stdout)
    names = [
        rev.get("name")
        for entry in experiments
        for experiment in (entry.get("experiments") or [])
        for rev in experiment.get("revs", [])
    ]
    assert "lenient" in names
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], committed_copy).stdout)
    changed = diff["metrics/monitoring.json"]["batches_insufficient_data"]  # tiny batches are now judged
    assert changed["new"] < changed["old"]
    params = json.loads(run(["dvc", "params", "diff", "--json"], committed_copy).stdout)
    assert params["params.yaml"]["model_monitoring.min_households"]["new"] == 1
