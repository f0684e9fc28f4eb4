"""Step 05: drift that matters is never silent. One judged feature far beyond its natural level — how far the training
campaigns stray from each other, measured by resampling them — raises a `retrain` alert by itself, with the rules of
params.yaml; the thresholds come from the training reference, never from the replay they judge."""

import numpy as np
import pandas as pd

from conftest import ROOT
from lib.core import load_yaml
from lib.model_development import CATEGORICAL, FEATURE_KINDS, NUMERIC
from lib.model_monitoring import (
    HISTORY_TOTALS,
    check_feature_kinds,
    check_params,
    drift_findings,
    evaluate_rules,
    judge_drift,
    measure_drift,
    reference_by_type,
    reference_resampling,
    summarize_drift,
)

KPI_IDS = [k["id"] for k in load_yaml(ROOT / "charter.yaml")["kpis"]]
PARAMS = check_params(load_yaml(ROOT / "params.yaml")["model_monitoring"], KPI_IDS)
CHARTER = {"kpis": [], "ml_problem": {"acceptance": {"roc_auc": 0.7}}}


def campaign_rows(campaign_id, households, rng, shift=0.0):
    """One Type A campaign: two offers per household, features from the same world but one shifted by `shift`."""
    n = 2 * households
    frame = pd.DataFrame(
        {
            "household_id": np.repeat(np.arange(households) + 10_000 * campaign_id, 2),
            "campaign_id": campaign_id,
            "campaign_type": "Type A",
            **{c: rng.gamma(2.0, 1.0, n) for c in NUMERIC},
            **{c: rng.choice(["a", "b", "c"], n) for c in CATEGORICAL if c != "campaign_type"},
        }
    )
    for f in FEATURE_KINDS["campaign"][:3]:
        frame[f] = 30.0 * campaign_id  # one value per campaign; later campaigns see a longer history ...
    for f in HISTORY_TOTALS:
        frame[f] *= campaign_id  # ... and larger totals over it
    return frame.assign(spend_per_week=frame.spend_per_week + shift)


def judged_result(batch, reference, scores):
    """What the replay records for a scored batch: the drift judged by the reference's natural levels, and findings."""
    spec = {**reference["features"], "prediction": reference["prediction"]}
    drift = judge_drift(
        measure_drift(batch.assign(prediction=scores), spec),
        reference["natural"],
        PARAMS["psi_drifted"],
        PARAMS["severe_factor"],
    )
    features = drift[drift.feature != "prediction"]
    kinds, findings = check_feature_kinds(batch, reference)
    prediction = drift[drift.feature == "prediction"].iloc[0]
    metrics = {
        **summarize_drift(features, PARAMS["drift_exclude"]),
        **kinds,
        "prediction_psi": prediction.psi,
        "prediction_psi_threshold": prediction.severe_above,
    }
    findings |= drift_findings(features, PARAMS["drift_exclude"])
    where = {"batch": "campaign 9", "campaign_id": 9, "start_date": "2017-10-01", "status": "ok"}
    return {**where, "metrics": metrics, "findings": findings}


def test_one_feature_far_beyond_its_natural_level_raises_retrain_by_itself():
    rng = np.random.default_rng(0)
    training = pd.concat([campaign_rows(c, 300, rng) for c in (1, 2, 3)], ignore_index=True)
    scores = rng.random(len(training))
    resampling = reference_resampling(PARAMS, 42)
    reference = reference_by_type(training, scores, 10, 100, resampling)["Type A"]
    assert reference["natural"]["campaigns"] == [1, 2, 3]
    assert reference["natural"]["features"]["spend_per_week"] < PARAMS["psi_drifted"]  # same world: little variation

    calm = judged_result(campaign_rows(9, 300, rng), reference, rng.random(600))
    assert not [a for a in evaluate_rules([calm], PARAMS["rules"], CHARTER) if a["severity"] != "info"]

    moved = judged_result(campaign_rows(9, 300, rng, shift=4.0), reference, rng.random(600))
    assert moved["metrics"]["drifted_feature_share"] < 0.35  # one feature of many: the share rule stays silent
    alerts = [a for a in evaluate_rules([moved], PARAMS["rules"], CHARTER) if a["severity"] != "info"]
    assert [(a["metric"], a["remediation"]) for a in alerts] == [("severe_drift_features", "retrain")]
    assert "spend_per_week: PSI" in alerts[0]["message"] and "severe level" in alerts[0]["message"]


def test_the_prediction_threshold_comes_from_the_reference():
    rng = np.random.default_rng(1)
    training = pd.concat([campaign_rows(c, 300, rng) for c in (1, 2)], ignore_index=True)
    reference = reference_by_type(training, rng.random(len(training)), 10, 100, reference_resampling(PARAMS, 42))
    natural = reference["Type A"]["natural"]["prediction"]
    result = judged_result(campaign_rows(9, 300, rng), reference["Type A"], rng.random(600) ** 6)  # scores collapse
    expected = PARAMS["severe_factor"] * max(natural, PARAMS["psi_drifted"])
    assert result["metrics"]["prediction_psi_threshold"] == expected
    alerts = [a for a in evaluate_rules([result], PARAMS["rules"], CHARTER) if a["severity"] != "info"]
    assert ("prediction_psi", "retrain") in {(a["metric"], a["remediation"]) for a in alerts}


def test_features_left_out_of_the_verdict_get_a_check_of_their_kind():
    rng = np.random.default_rng(2)
    training = pd.concat([campaign_rows(c, 300, rng) for c in (1, 2)], ignore_index=True)
    reference = reference_by_type(training, rng.random(len(training)), 10, 100)["Type A"]
    batch = campaign_rows(9, 300, rng)
    mixed = batch.assign(campaign_n_offers=np.where(batch.index < 10, 7.0, 9.0))  # two campaigns' values in one
    lost = batch.assign(baskets=batch.baskets / 100)  # a longer history with fewer baskets
    rules = [r for r in PARAMS["rules"] if r["metric"] == "inconstant_campaign_features"]
    alerts = evaluate_rules([judged_result(mixed, reference | {"natural": {}}, rng.random(600))], rules, CHARTER)
    assert [(a["remediation"], a["severity"]) for a in alerts] == [("pipeline", "critical")]
    assert "campaign_n_offers (2 values)" in alerts[0]["message"]
    counts, findings = check_feature_kinds(lost, reference)
    assert counts["shrunk_history_features"] == 1 and findings["shrunk_history_features"].startswith("baskets: mean")
