"""Step 04: the registry gate (first deployment, rejection, rollback, a registry that lost what DVC points to), chunked
scoring, REST serving against batch scores, and the stage end to end on the smoke slice."""

import json
import os
import shutil
import stat
import urllib.request
from contextlib import contextmanager

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import run
from lib import model_development as md
from lib.core import load_json, tracking_uri
from lib.data_acquisition import load_processed
from lib.model_deployment import (
    RegistryStateError,
    campaign_featurizer,
    campaign_rows,
    champion_version,
    check_candidate_in_store,
    deploy_candidate,
    invoke,
    predict_scores,
    rollback,
    score_in_chunks,
    serving,
)

ACCEPTANCE = {
    "roc_auc": 0.6,
    "average_precision": 0.05,
    "precision_at_k": 0.02,
    "lift_average_precision": 1.0,
    "lift_precision_at_k": 1.0,
}
NAME = "toy-offers"


def toy_rows(n_households=60, n_offers=8, seed=0) -> pd.DataFrame:
    """Labelled rows with step 03's keys and feature columns; redemption follows `offer_spend`, and the rule feature is
    noise."""
    rng = np.random.default_rng(seed)
    keys = pd.MultiIndex.from_product(
        [range(1, n_households + 1), [99], range(500, 500 + n_offers)], names=md.KEYS
    ).to_frame(index=False)
    frame = keys.assign(
        **{c: rng.random(len(keys)) for c in md.NUMERIC},
        **{c: rng.choice(["A", "B", "Unknown"], len(keys)) for c in md.CATEGORICAL},
    )
    frame["label"] = (frame.offer_spend + 0.3 * rng.random(len(keys)) > 1.0).astype(int)
    return frame


def log_toy_model(flip=False) -> dict:
    """A logistic regression on `offer_spend` logged like step 03's candidates (pyfunc answers predict_proba); a
    pointer to it."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    rows = toy_rows(seed=1)
    model = Pipeline(
        [("prep", ColumnTransformer([("num", "passthrough", ["offer_spend"])])), ("model", LogisticRegression())]
    )
    model.fit(rows[md.FEATURES], 1 - rows.label if flip else rows.label)
    with mlflow.start_run() as active:
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            pyfunc_predict_fn="predict_proba",
            pip_requirements=["scikit-learn"],
            signature=mlflow.models.infer_signature(
                rows[md.FEATURES].head(), model.predict_proba(rows[md.FEATURES].head())
            ),
        )
    return {
        "name": "worse" if flip else "good",
        "run_id": active.info.run_id,
        "model_uri": info.model_uri,
        "lineage": {"git_commit": "0" * 40, "params_sha256": "1" * 64},
    }


@contextmanager
def tracking(uri):
    """`uri` as MLflow's tracking URI (which MLflow also exports as MLFLOW_TRACKING_URI) for the block; the one before
    comes back."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A new MLflow store's database, made once: creating its tables takes seconds, copying the file does not."""
    path = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store):
    """A throw-away MLflow store (a copy of the new one), made the tracking URI for the test."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    with tracking(f"sqlite:///{tmp_path}/mlflow.db") as uri:
        mlflow.set_experiment(
            experiment_id=mlflow.create_experiment("toy", artifact_location=(tmp_path / "artifacts").as_uri())
        )
        yield uri


def deploy(client, pointer, rows):
    return deploy_candidate(client, NAME, pointer, rows, 3, ACCEPTANCE, ["average_precision", "precision_at_k"], 0.01)


def test_first_deployment_then_a_worse_candidate_is_rejected_and_champion_does_not_move(store):
    client, rows = MlflowClient(store), toy_rows()
    first = deploy(client, log_toy_model(), rows)
    assert (
        first.decision.passed
        and first.champion_metrics is None
        and first.aliases == {"champion_before": None, "champion_after": "1"}
    )
    assert first.version.tags["git_commit"] == "0" * 40 and first.version.tags["gate"] == "passed"
    worse = deploy(client, log_toy_model(flip=True), rows)
    assert not worse.decision.passed
    assert any("average_precision_change_vs_champion" in r for r in worse.decision.reasons)
    assert any("roc_auc" in r and "threshold" in r for r in worse.decision.reasons)
    tags = client.get_model_version(NAME, str(worse.version.version)).tags
    assert tags["gate"] == "rejected" and "average_precision_change_vs_champion" in tags["gate_reasons"]
    assert str(champion_version(client, NAME).version) == "1" == worse.aliases["champion_after"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "previous")  # nothing moved: there is still no @previous


def test_rollback_changes_what_batch_scoring_uses_without_code_change(store):
    client, rows = MlflowClient(store), toy_rows()

    def featurize(chunk):
        return rows.merge(chunk[md.KEYS], on=md.KEYS)

    def score():
        champion = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")  # resolved anew: what scoring uses now
        return score_in_chunks(rows[md.KEYS], featurize, {"score": lambda f: predict_scores(champion, f)}, 25)[
            0
        ].score.to_numpy()

    deploy(client, log_toy_model(), rows)
    first_scores = score()
    second = deploy_candidate(
        client, NAME, log_toy_model(flip=True), rows, 3, ACCEPTANCE, [], 0.01, enforce_acceptance=False
    )
    assert second.decision.passed and second.aliases == {
        "champion_before": "1",
        "champion_after": "2",
    }  # no regression check, not enforced
    second_scores = score()
    assert not np.allclose(first_scores, second_scores)
    assert rollback(client, NAME) == {"champion_before": "2", "champion_after": "1"}
    np.testing.assert_array_equal(score(), first_scores)
    assert client.get_model_version(NAME, "2").tags["deployment"] == "rolled_back"


def test_a_store_without_the_candidates_run_is_a_clear_error(store, tmp_path):
    pointer = log_toy_model()
    empty = f"sqlite:///{tmp_path}/fresh.db"
    with pytest.raises(RegistryStateError, match="does not hold") as err:
        check_candidate_in_store(MlflowClient(empty), pointer, empty)
    assert "dvc repro --force --single-item model_development" in str(err.value)


# --- on the smoke slice, with step 03's real features and champion ---------------------------------------------------


def store_of(project) -> str:
    """The MLflow store of a project copy (never the one the environment may name)."""
    return tracking_uri(project, {})


@pytest.fixture(scope="module")
def smoke(smoke_pipeline):
    store = store_of(smoke_pipeline)  # the copy's own store: `run` never passes on an exported tracking URI
    params = __import__("yaml").safe_load((smoke_pipeline / "params.yaml").read_text())
    tables = load_processed(smoke_pipeline, md.FEATURE_TABLES)
    settings = md.development_settings(
        load_json(smoke_pipeline / "models/candidate.json")
    )  # what the stage read: step 03's own settings
    rows = campaign_rows(tables, params["model_deployment"]["target_campaign"])
    featurize = campaign_featurizer(tables, rows.start_date.iloc[0], settings["promo_weeks"])
    with tracking(store):
        yield {
            "project": smoke_pipeline,
            "store": store,
            "params": params,
            "settings": settings,
            "rows": rows,
            "featurize": featurize,
            "tables": tables,
            "champion": load_json(smoke_pipeline / "models/champion.json"),
        }


@pytest.mark.pipeline
def test_chunked_scoring_equals_scoring_all_rows_at_once(smoke):
    model = mlflow.pyfunc.load_model(smoke["champion"]["model_uri"])
    predict = {"score": lambda f: predict_scores(model, f)}
    at_once, _ = score_in_chunks(smoke["rows"], smoke["featurize"], predict, 10_000)
    chunked, timings = score_in_chunks(smoke["rows"], smoke["featurize"], predict, 7)
    assert len(timings) > 5 and len(at_once) == len(smoke["rows"])
    pd.testing.assert_frame_equal(chunked, at_once)
    some = smoke["rows"][smoke["rows"].household_id.isin(smoke["rows"].household_id.unique()[:4])]
    promo_weeks = smoke["settings"]["promo_weeks"]  # the featurizer reads only history: same features as training's
    pd.testing.assert_frame_equal(smoke["featurize"](some), md.build_features(some, smoke["tables"], promo_weeks))
    stage = pd.read_parquet(smoke["project"] / "data/scored/scores.parquet")
    np.testing.assert_array_equal(stage.score.to_numpy(), at_once.score.to_numpy())


class Boom(Exception):
    pass


@pytest.mark.pipeline
def test_rest_scores_equal_the_batch_scores_and_the_server_always_stops(smoke, tmp_path):
    features = smoke["featurize"](
        smoke["rows"][smoke["rows"].household_id.isin(smoke["rows"].household_id.unique()[:5])]
    )
    batch = pd.read_parquet(smoke["project"] / "data/scored/scores.parquet").merge(features[md.KEYS], on=md.KEYS)
    env = {**os.environ, "MLFLOW_TRACKING_URI": smoke["store"]}
    with pytest.raises(Boom):
        with serving(
            f"models:/{smoke['champion']['name']}@champion", env, tmp_path / "server.log", startup_timeout_s=180
        ) as url:
            rest = invoke(url, features, timeout_s=30)
            np.testing.assert_array_equal(rest, batch.score.to_numpy())
            raise Boom()  # the block fails: the server must be stopped all the same
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/ping", timeout=2)


@pytest.mark.pipeline
def test_stage_outputs_registry_and_privacy(smoke):
    project, params = smoke["project"], smoke["params"]["model_deployment"]
    champion, client = smoke["champion"], MlflowClient(smoke["store"])
    assert str(champion_version(client, champion["name"]).version) == champion["version"]
    assert champion["model_uri"] == f"models:/{champion['name']}/{champion['version']}" and champion["metrics"]
    send = pd.read_parquet(project / "data/scored/send_list.parquet")
    assert list(send.columns) == ["household_id", "contact_key", "campaign_id", "coupon_upc", "score", "rank"]
    assert (send.campaign_id == params["target_campaign"]).all() and send.groupby("household_id").size().max() <= 3
    scores = pd.read_parquet(project / "data/scored/scores.parquet")
    assert len(scores) == len(smoke["rows"])  # 100% of the eligible rows
    delivery_file = project / "data/delivery/send_list_with_contacts.csv"
    assert stat.S_IMODE(delivery_file.stat().st_mode) == 0o600
    delivery, raw = pd.read_csv(delivery_file), pd.read_parquet(project / "data/raw/contacts.parquet")
    assert len(delivery) == len(send) and set(delivery.email) <= set(raw.email)
    emails = set(delivery.email)
    for path in [
        *project.glob("reports/**/*"),
        *project.glob("data/scored/*"),
        *project.glob("metrics/*"),
        *project.glob("models/**/*"),
        *project.glob("mlartifacts/**/*"),
    ]:
        if path.is_file():
            assert not any(e in path.read_bytes().decode(errors="ignore") for e in emails), f"raw contact in {path}"
    metrics, latest = load_json(project / "metrics/deployment.json"), load_json(project / "metrics/latest_kpis.json")
    charter = load_json(project / "data/charter.json")
    assert set(latest) == {k["id"] for k in charter["kpis"]} and all(
        isinstance(v, (int, float)) for v in metrics.values()
    )
    assert metrics["send_list.rows"] == len(send) and metrics["gate.enforced_acceptance"] == 0
    assert champion["gate"] == {
        k: params[k] for k in ("regression_metrics", "regression_margin")
    }  # the closed loop of step 05 reads it
    page = (project / "reports/html/04_model_deployment.html").read_text()
    assert "NOT enforced" in page and "Traceback" not in page and "def deploy_candidate" not in page
    assert (project / "models/docker/Dockerfile").read_text().startswith("# Build an image") and (
        project / "models/docker/model_dir/MLmodel"
    ).exists()


@pytest.mark.pipeline
def test_stage_stops_clearly_when_the_store_lost_the_candidate_and_repairs_a_lost_champion(smoke, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(smoke["project"], project, symlinks=True)
    shutil.copy(smoke["store"].removeprefix("sqlite:///"), project / "mlflow.db")  # the copy gets its own store
    uri = store_of(project)
    env = {"MLFLOW_TRACKING_URI": uri}
    MlflowClient(uri).delete_registered_model(smoke["champion"]["name"])  # the registry lost the champion ...
    repaired = run(["dvc", "repro", "--force", "--single-item", "model_deployment"], project, env=env)
    assert "model_deployment" in repaired.stdout
    assert str(champion_version(MlflowClient(uri), smoke["champion"]["name"]).version) == "1"
    assert "Registry repaired" in (project / "reports/html/04_model_deployment.html").read_text()
    (project / "mlflow.db").unlink()  # ... then the whole store is gone
    lock_before = (project / "dvc.lock").read_text()
    failed = run(["dvc", "repro", "--force", "--single-item", "model_deployment"], project, check=False, env=env)
    assert (
        failed.returncode != 0
        and "does not hold" in failed.stderr
        and "dvc repro --force --single-item model_development" in failed.stderr
    )
    assert (project / "dvc.lock").read_text() == lock_before
    record = json.loads((project / "models/deployments.json").read_text())
    assert [r["decision"] for r in record][-1] == "already champion" and record[0]["decision"] == "promoted"
