"""Steps 03 to 05 through DVC on the Spark engine give the pandas run's development rows, metrics, reference, scores,
send list and KPIs. A module of its own: its three stage runs are the longest single test, and the pipeline tier
starts it on a worker of its own beside tests/test_spark_engine.py."""

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import SPARK_LOCAL, run
from lib import model_development as md
from lib.core import load_json, load_yaml

DEVELOPED = ("metrics/model_development.json", "models/reference_stats.json")  # what step 03 measured on its rows


def _without_run_ids(document) -> dict:
    return {k: v for k, v in document.items() if k != "run_id"}


def _deployment_answers(project) -> dict:
    "What step 04 of `project` delivered: the scores, the send list and the campaign's KPIs."
    scores = pd.read_parquet(project / "data/scored/scores.parquet")[[*md.KEYS, "score"]]
    sends = pd.read_parquet(project / "data/scored/send_list.parquet")[[*md.KEYS, "rank"]]
    return {"scores": scores, "send_list": sends, "kpis": load_json(project / "metrics/latest_kpis.json")}


def _assert_same_deployment(got, want):
    "The same scored rows (scores within 1e-9), the same send list, the same KPIs."
    assert len(want["scores"]) > 0
    pd.testing.assert_frame_equal(got["scores"][md.KEYS], want["scores"][md.KEYS])
    assert np.abs(got["scores"].score.to_numpy() - want["scores"].score.to_numpy()).max() <= 1e-9
    pd.testing.assert_frame_equal(got["send_list"], want["send_list"])
    assert got["kpis"] == want["kpis"]


@pytest.mark.pipeline
def test_engine_spark_runs_steps_03_to_05_with_the_same_development_rows(deployed_smoke):
    """It switches its copy of the smoke run to the Spark engine and reruns steps 03 and 04, then runs
    step 05, whose replay builds each batch's features on Spark. Step 03 on Spark writes the development rows itself and
    draws the training sample there: the metrics and the reference are those of the pandas run. Step 04 on Spark, which
    holds only the small tables, gives the pandas run's scores, send list and KPIs."""
    project = deployed_smoke
    on_pandas = pd.read_parquet(project / "data/features/development.parquet")
    developed = [_without_run_ids(load_json(project / p)) for p in DEVELOPED]
    deployed = _deployment_answers(project)
    params = load_yaml(project / "params.yaml")
    params["shared"]["engine"], params["spark"] = "spark", SPARK_LOCAL
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = [
        run(["dvc", "repro", "--single-item", s], project)
        for s in ("model_development", "model_deployment", "model_monitoring")
    ]
    said = [proc.stdout + proc.stderr for proc in stages]
    assert "features on Spark (local[2])" in said[0] and "scoring on Spark (local[2])" in said[1]
    assert "features on Spark (local[2]): 2 campaigns" in said[1]  # the gate's rows of campaigns 16 and 17
    assert (project / "data/features/development.parquet").is_dir()  # written by Spark, not collected to the driver
    on_spark = pd.read_parquet(project / "data/features/development.parquet")
    pd.testing.assert_frame_equal(on_spark, on_pandas, check_exact=True)
    assert [_without_run_ids(load_json(project / p)) for p in DEVELOPED] == developed  # the same sample, the same fits
    _assert_same_deployment(_deployment_answers(project), deployed)
    executed = (project / "reports/executed/05_model_monitoring.ipynb").read_text()
    assert "**features:** Spark (`local[2]`)" in executed  # the replay's header names the engine that built features
    assert load_json(project / "metrics/monitoring.json")
