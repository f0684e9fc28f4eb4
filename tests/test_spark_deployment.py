"""Steps 04 and 05 through DVC on the Spark engine: step 04, which holds only the small tables, gives the pandas run's
scores, send list and KPIs, and step 05's replay builds on Spark the batch whose stored result was removed (the one the
pandas run judged: metrics, drift, KPIs) and gives the pandas run's results. A module of its own, like
tests/test_spark_pipeline.py (step 03 on Spark), so that the pipeline tier runs the two side by side."""

import numpy as np
import pandas as pd
import pytest

from conftest import assert_close, run, use_spark
from lib import model_development as md
from lib import model_monitoring as mon
from lib.core import load_json


def _deployment_answers(project) -> dict:
    "What step 04 of `project` delivered: the scores, the send list and the campaign's KPIs."
    scores = pd.read_parquet(project / "data/scored/scores.parquet")[[*md.KEYS, "score"]]
    sends = pd.read_parquet(project / "data/scored/send_list.parquet")[[*md.KEYS, "rank"]]
    return {"scores": scores, "send_list": sends, "kpis": load_json(project / "metrics/latest_kpis.json")}


def _batch_results(project) -> dict:
    "Step 05's stored result of each batch, without what differs between any two runs (its seconds, its fingerprint)."
    stored = sorted((project / "data/monitoring/batches").glob("campaign_*.json"))
    return {p.stem: {k: v for k, v in load_json(p).items() if k not in ("seconds", "fingerprint")} for p in stored}


def _assert_same_deployment(got, want):
    "The same scored rows (scores within 1e-9), the same send list, the same KPIs."
    assert len(want["scores"]) > 0
    pd.testing.assert_frame_equal(got["scores"][md.KEYS], want["scores"][md.KEYS])
    assert np.abs(got["scores"].score.to_numpy() - want["scores"].score.to_numpy()).max() <= 1e-9
    pd.testing.assert_frame_equal(got["send_list"], want["send_list"])
    assert got["kpis"] == want["kpis"]


@pytest.mark.pipeline
def test_steps_04_and_05_on_spark_give_the_pandas_scores_and_batch_results(deployed_smoke):
    project = deployed_smoke
    deployed, replayed = _deployment_answers(project), _batch_results(project)
    judged = next(name for name, result in replayed.items() if result["status"] == "ok")  # metrics, drift, KPIs
    state_dir = project / "data/monitoring/batches"
    mon.state_path(state_dir, replayed[judged]["campaign_id"]).unlink()  # the replay builds this batch again, on Spark
    use_spark(project)
    said = [
        run(["dvc", "repro", "--force", "--single-item", s], project) for s in ("model_deployment", "model_monitoring")
    ]
    printed = [proc.stdout + proc.stderr for proc in said]
    assert "scoring on Spark (local[2])" in printed[0]
    assert "features on Spark (local[2]): 2 campaigns" in printed[0]  # the gate's rows of campaigns 16 and 17
    _assert_same_deployment(_deployment_answers(project), deployed)
    executed = (project / "reports/executed/05_model_monitoring.ipynb").read_text()
    assert "**features:** Spark (`local[2]`)" in executed  # the replay's header names the engine that built features
    assert load_json(project / "data/monitoring/run.json")["computed"] == [replayed[judged]["batch"]]
    assert_close(_batch_results(project), replayed)  # the batch built on Spark, and those reused, as on pandas
