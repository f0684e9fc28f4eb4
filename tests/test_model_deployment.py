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
    RULE_NAME,
    RegistryStateError,
    champion_version,
    check_candidate_in_store,
    commit_deployment,
    gate_candidate,
    invoke,
    judge,
    log_rule_model,
    predict_scores,
    prepare_campaign,
    promote,
    register_candidate,
    rollback,
    rule_scores,
    score_in_chunks,
    serving,
    status_quo,
)

ACCEPTANCE = {
    "roc_auc": 0.6,
    "average_precision": 0.05,
    "precision_at_k": 0.02,
    "lift_average_precision": 1.0,
    "lift_precision_at_k": 1.0,
}
NAME = "toy-offers"
CHARTER = {
    "ml_problem": {
        "top_k": 3,
        "primary_metric": "precision_at_k",
        "acceptance": ACCEPTANCE,
        "gate": {"regression_margin": 0.05, "confidence": 0.95, "slices": ["income"]},
    },
    "policies": {"contact_frequency_cap": {"max_offers_per_household": 3}},
}


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


def deploy(client, pointer, rows, enforce_acceptance=True):
    """Step 04's pass through the gate, as the stage runs it: the status quo (the charter's rule when there is no
    champion), the gate, then the registry."""
    quo = status_quo(client, NAME) or log_rule_model(
        mlflow.get_experiment_by_name("toy").experiment_id, rows[md.FEATURES].head()
    )
    gate = gate_candidate(rows, pointer, quo, CHARTER, 1000, 0, enforce_acceptance)
    return commit_deployment(client, NAME, pointer, quo, gate.decision, [99])


def test_first_deployment_promotes_a_better_candidate_then_a_worse_one_is_rejected_and_champion_stays(store):
    client, rows = MlflowClient(store), toy_rows()
    first = deploy(client, log_toy_model(), rows)  # better than the rule (noise here) with evidence
    assert first.decision.outcome == "promote" and first.status_quo["name"] == RULE_NAME
    assert first.aliases == {"champion_before": None, "champion_after": "1"}
    assert first.version.tags["git_commit"] == "0" * 40 and first.version.tags["gate"] == "promote"
    worse = deploy(client, log_toy_model(flip=True), rows)
    assert worse.decision.outcome == "reject"
    assert any(r.startswith("precision_at_k is worse than the status quo's by") for r in worse.decision.reasons)
    tags = client.get_model_version(NAME, str(worse.version.version)).tags
    assert tags["gate"] == "reject" and "precision_at_k is worse" in tags["gate_reasons"]
    assert str(champion_version(client, NAME).version) == "1" == worse.aliases["champion_after"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "previous")  # nothing moved: there is still no @previous


def test_a_candidate_no_better_than_the_rule_leaves_the_rule_serving_as_champion(store):
    client, rows = MlflowClient(store), toy_rows()
    same_as_rule = log_rule_model(mlflow.get_experiment_by_name("toy").experiment_id, rows[md.FEATURES].head())
    first = deploy(client, {**same_as_rule, "name": "rule-like"}, rows, enforce_acceptance=False)  # noise: no minimums
    assert first.decision.outcome == "keep" and first.decision.reasons[0].startswith("no evidence that precision_at_k")
    champion = champion_version(client, NAME)
    assert champion.tags["candidate"] == RULE_NAME and str(champion.version) == first.aliases["champion_after"] == "2"
    served = predict_scores(mlflow.pyfunc.load_model(f"models:/{NAME}@champion"), rows)
    np.testing.assert_array_equal(served, rule_scores(rows))  # the rule, registered, scores like the rule


def test_the_gate_keeps_the_status_quo_itself_rejects_a_worse_and_promotes_a_better_candidate_with_seeded_intervals():
    rows = toy_rows(n_households=300, n_offers=6, seed=4)
    informed = rows.offer_spend.to_numpy() / 1.3  # what the labels follow
    noise = np.random.default_rng(5).random(len(rows))

    def judged(candidate, status_quo, seed=0):  # the evidence alone: noise cannot meet the charter's minimums
        return judge(rows, candidate, status_quo, 3, CHARTER["ml_problem"], 1000, seed, enforce_acceptance=False)

    assert judged(noise, noise).outcome == "keep"
    assert judged(noise, informed).outcome == "reject"
    better = judged(informed, noise)
    assert better.outcome == "promote" and (better.intervals.low > 0).all()
    pd.testing.assert_frame_equal(judged(informed, noise).intervals, better.intervals)  # same seed, same intervals
    assert not judged(informed, noise, seed=1).intervals.equals(better.intervals)


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
    second = register_candidate(client, NAME, log_toy_model(flip=True), {})
    assert promote(client, NAME, second.version) == {"champion_before": "1", "champion_after": "2"}
    second_scores = score()
    assert not np.allclose(first_scores, second_scores)
    assert rollback(client, NAME) == {"champion_before": "2", "champion_after": "1"}
    np.testing.assert_array_equal(score(), first_scores)
    assert client.get_model_version(NAME, "2").tags["deployment"] == "rolled_back"


def test_a_store_without_the_candidates_run_is_a_clear_error(store, tmp_path, empty_store):
    pointer = log_toy_model()
    empty = f"sqlite:///{shutil.copy(empty_store, tmp_path / 'fresh.db')}"
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
    target = prepare_campaign(tables, params["model_deployment"]["target_campaign"], settings["promo_weeks"])
    with tracking(store):
        yield {
            "project": smoke_pipeline,
            "store": store,
            "params": params,
            "settings": settings,
            "rows": target.rows,
            "featurize": target.featurize,
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
    assert champion["gate"] == {"bootstrap_resamples": params["bootstrap_resamples"]}  # step 05's closed loop reads it
    # on 150 households no candidate beats the charter's rule with evidence: the rule serves, end to end
    assert champion["candidate"] == RULE_NAME and metrics["champion.is_charter_rule"] == 1
    page = (project / "reports/html/04_model_deployment.html").read_text()
    assert "NOT enforced" in page and "Traceback" not in page and "def commit_deployment" not in page
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
    assert [r["decision"] for r in record] == ["kept", "kept"]  # the charter's rule stays, restored from its run


def project_with_own_store(smoke, dest):
    """A copy of the smoke project with its own copy of the MLflow store; returns (project, store URI)."""
    shutil.copytree(smoke["project"], dest, symlinks=True)
    shutil.copy(smoke["store"].removeprefix("sqlite:///"), dest / "mlflow.db")
    return dest, store_of(dest)


def registry_state(client, name) -> dict:
    "Every version of `name` with its tags, and the aliases."
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return {}
    versions = client.search_model_versions(f"name = '{name}'")
    return {"aliases": dict(model.aliases), "versions": {v.version: dict(v.tags) for v in versions}}


@pytest.mark.pipeline
def test_a_failure_after_the_gate_leaves_the_registry_and_the_pointers_as_they_were(smoke, tmp_path):
    project, uri = project_with_own_store(smoke, tmp_path / "project")
    client, name = MlflowClient(uri), smoke["champion"]["name"]
    client.delete_registered_model(name)  # a first deployment: the gate would register and alias versions
    for pointer in ("champion.json", "deployments.json"):
        (project / "models" / pointer).unlink()
    (project / "data/raw/contacts.parquet").write_bytes(b"not parquet")  # read after the gate, for the delivery
    failed = run(
        ["dvc", "repro", "--single-item", "model_deployment"], project, check=False, env={"MLFLOW_TRACKING_URI": uri}
    )
    assert failed.returncode != 0 and "contacts.parquet" in failed.stderr + failed.stdout
    assert registry_state(client, name) == {}  # no version registered, no alias set
    assert not (project / "models/champion.json").exists() and not (project / "models/deployments.json").exists()


@pytest.mark.pipeline
def test_a_registry_that_disagrees_with_the_committed_pointer_stops_the_stage_until_reconciled(smoke, tmp_path):
    project, uri = project_with_own_store(smoke, tmp_path / "project")
    client, committed = MlflowClient(uri), smoke["champion"]
    other = next(
        v
        for v in client.search_model_versions(f"name = '{committed['name']}'")
        if str(v.version) != committed["version"]
    )
    client.set_registered_model_alias(committed["name"], "champion", other.version)  # e.g. another commit's registry
    env = {"MLFLOW_TRACKING_URI": uri}
    for stage in ("model_deployment", "model_monitoring"):
        failed = run(["dvc", "repro", "--force", "--single-item", stage], project, check=False, env=env)
        assert failed.returncode != 0, stage
        assert (
            f"champion.json names version {committed['version']} of '{committed['name']}' as champion, but the "
            f"registry at {uri} serves version {other.version} as @champion" in failed.stderr
        ) and "reconcile-registry" in failed.stderr, failed.stderr[-2000:]
    fixed = run(["reconcile-registry"], project, env=env)
    assert f"version {other.version} -> {committed['version']}" in fixed.stdout
    assert str(champion_version(client, committed["name"]).version) == committed["version"]
