"""The Spark engine: its session fails clearly without Java or with a master that does not answer, and on the smoke
slice it builds the same feature table, the same scores and the same send list as the pandas engine."""

import json
import os
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from conftest import ROOT, make_project_copy, run
from lib import model_deployment as dep
from lib import model_development as md
from lib.core import SparkUnavailableError, load_yaml, spark_session
from lib.data_acquisition import load_processed

LOCAL = {"master": "local[2]", "config": {"spark.sql.shuffle.partitions": 4}}
CAMPAIGNS = [16, 17, 18]  # the smoke slice's gate campaigns and the target campaign of step 04
TOP_K = 3


def test_the_shipped_params_run_on_pandas_unless_told():
    params = load_yaml(ROOT / "params.yaml")
    assert params["shared"]["engine"] == "pandas" and params["spark"]["master"] == "local[*]"


def test_without_java_the_session_says_how_to_install_it(tmp_path):
    script = "from lib.core import spark_session; spark_session({'master': 'local[1]', 'config': {}})"
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"} | {"PATH": str(tmp_path)}  # no java anywhere
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "SparkUnavailableError" in proc.stderr and "apt-get install -y openjdk-17-jre-headless" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_master_is_named_within_the_wait():
    master = f"spark://127.0.0.1:{_free_port()}"
    started = time.perf_counter()
    with pytest.raises(SparkUnavailableError, match=f"Spark master {master} does not answer"):
        spark_session({"master": master, "config": {}}, timeout_s=2)
    assert time.perf_counter() - started < 10


@pytest.fixture(scope="module")
def deployed_smoke(tmp_path_factory):
    """A smoke-slice copy of the project run up to step 04: processed data, a candidate and a registered @champion."""
    project = make_project_copy(tmp_path_factory.mktemp("spark") / "project")
    run(["dvc", "repro", "model_deployment"], project)
    return project


@pytest.fixture(scope="module")
def spark():
    session = spark_session(LOCAL)
    yield session
    session.stop()


def _scores_both_ways(spark, model_uri, rows, features_path, out):
    on_pandas = dep.predict_scores(mlflow.pyfunc.load_model(model_uri), rows)
    on_spark = pd.read_parquet(dep.spark_scores(spark, spark.read.parquet(str(features_path)), model_uri, out))
    on_spark = on_spark.sort_values(md.KEYS, ignore_index=True)
    return rows[md.KEYS].assign(score=on_pandas), on_spark


@pytest.mark.pipeline
def test_spark_features_scores_and_send_list_equal_the_pandas_ones(deployed_smoke, spark, tmp_path):
    project = deployed_smoke
    promo_weeks = load_yaml(project / "params.yaml")["model_development"]["promo_weeks"]
    tables = load_processed(project, md.FEATURE_TABLES)
    on_pandas = md.build_labelled_rows(tables, CAMPAIGNS, promo_weeks)

    small, transactions, promotions = md.spark_tables(spark, project)
    features_path = md.spark_features(
        spark, small, transactions, promotions, CAMPAIGNS, tmp_path / "features", promo_weeks, 8, labelled=True
    )
    on_spark = pd.read_parquet(features_path).sort_values(md.KEYS, ignore_index=True)
    pd.testing.assert_frame_equal(on_spark, on_pandas, check_exact=True)  # same values, same dtypes
    assert not list(tmp_path.glob(".features.*"))  # the temporary folder was renamed into place

    store = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    name = load_yaml(project / "params.yaml")["model_deployment"]["registered_model"]
    champion = dep.champion_model_uri(MlflowClient(store), name)
    candidate = json.loads((project / "models/candidate.json").read_text())["model_uri"]
    contacts = load_processed(project, ["contacts"])["contacts"]
    for i, model_uri in enumerate(dict.fromkeys([champion, candidate])):  # the rule or a fitted model, and a fitted one
        want, got = _scores_both_ways(spark, model_uri, on_pandas, features_path, tmp_path / f"scores{i}")
        pd.testing.assert_frame_equal(got[md.KEYS], want[md.KEYS])
        assert np.abs(got.score.to_numpy() - want.score.to_numpy()).max() <= 1e-9, model_uri
        target = [s[s.campaign_id == CAMPAIGNS[-1]] for s in (want, got)]
        send_lists = [dep.build_send_list(s, TOP_K, [], contacts) for s in target]
        columns = ["household_id", "campaign_id", "coupon_upc", "rank"]
        pd.testing.assert_frame_equal(send_lists[1][columns], send_lists[0][columns])


@pytest.mark.pipeline
def test_engine_spark_runs_steps_03_and_04_with_the_same_development_rows(deployed_smoke):
    """Last in this module: it switches the shared smoke copy to the Spark engine and reruns steps 03 and 04."""
    project = deployed_smoke
    on_pandas = pd.read_parquet(project / "data/features/development.parquet")
    params = load_yaml(project / "params.yaml")
    params["shared"]["engine"], params["spark"] = "spark", LOCAL
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = [run(["dvc", "repro", "--single-item", s], project) for s in ("model_development", "model_deployment")]
    said = [proc.stdout + proc.stderr for proc in stages]
    assert "features on Spark (local[2])" in said[0] and "scoring on Spark (local[2])" in said[1]
    on_spark = pd.read_parquet(project / "data/features/development.parquet")
    pd.testing.assert_frame_equal(on_spark, on_pandas, check_exact=True)
    scores = pd.read_parquet(project / "data/scored/scores.parquet")
    assert len(scores) > 0 and scores.score.between(0, 1).all()
