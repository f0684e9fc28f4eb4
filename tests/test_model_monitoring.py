"""Step 05 model monitoring: drift statistics with known answers, insufficient data, failure drills and their
remediation
classes, the incremental replay, the closed loop, and the stage's outputs in a DVC run on the smoke slice."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, run
from lib.core import load_json, load_yaml, merge_params, tracking_uri
from lib.data_acquisition import load_processed
from lib.model_development import FEATURE_TABLES, FEATURES
from lib.model_monitoring import (
    REMEDIATIONS,
    SCENARIOS,
    Monitor,
    bin_shares,
    category_shares,
    check_params,
    compare_with_rule,
    diagnose,
    evaluate_rules,
    js_distance,
    load_scorer,
    measure_drift,
    monitor_batch,
    plan_batches,
    psi,
    reference_by_type,
    reference_resampling,
    replay,
    summarize_drift,
)

SMOKE = merge_params(
    load_yaml(ROOT / "params.yaml"), load_yaml(ROOT / "tests/smoke/params.yaml")
)  # what a smoke run reads


# ---------------------------------------------------------------- drift statistics: known answers


def test_identical_samples_have_zero_drift():
    shares = np.array([0.1, 0.2, 0.3, 0.4])
    assert psi(shares, shares) == 0.0 and js_distance(shares, shares) == 0.0
    values = np.random.default_rng(0).gamma(2.0, 1.0, 10_000)
    cuts = np.quantile(values, np.linspace(0, 1, 11)[1:-1])
    reference = {"x": {"kind": "numeric", "cuts": cuts.tolist(), "proportions": bin_shares(values, cuts).tolist()}}
    drift = measure_drift(pd.DataFrame({"x": values}), reference)
    assert drift.psi.iloc[0] == 0.0 and drift.js.iloc[0] == 0.0


def test_known_shift_has_known_psi_and_crosses_the_threshold():
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * np.log(1.8) + 0.4 * np.log(5), abs=1e-12)
    assert js_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, 20_000)
    cuts = np.quantile(train, np.linspace(0, 1, 11)[1:-1])
    reference = {
        "x": {"kind": "numeric", "cuts": cuts.tolist(), "proportions": bin_shares(train, cuts).tolist()},
        "c": {"kind": "categorical", "proportions": {"a": 0.5, "b": 0.5}},
    }
    same = pd.DataFrame({"x": rng.normal(0, 1, 5_000), "c": rng.choice(["a", "b"], 5_000)})
    moved = pd.DataFrame({"x": rng.normal(1, 1, 5_000), "c": rng.choice(["a", "b"], 5_000, p=[0.9, 0.1])})
    assert (measure_drift(same, reference).psi < 0.02).all()
    shifted = measure_drift(moved, reference).set_index("feature")
    assert (shifted.psi > 0.25).all()
    assert shifted.loc["c", "psi"] == pytest.approx(
        0.4 * np.log(1.8) + 0.4 * np.log(5), abs=0.05
    )  # sampled (0.9, 0.1) vs (0.5, 0.5)
    assert summarize_drift(measure_drift(moved, reference))["drifted_feature_share"] == 1.0


def test_unseen_categories_and_empty_batches():
    assert category_shares(["a", "new", "new", "new"], ["a", "b"]).tolist() == [0.25, 0.0, 0.75]
    assert np.isnan(category_shares([], ["a"])).all() and np.isnan(bin_shares([], [0.5])).all()
    summary = summarize_drift(
        measure_drift(pd.DataFrame({"x": []}), {"x": {"kind": "categorical", "proportions": {"a": 1.0}}})
    )
    assert np.isnan(summary["max_feature_psi"])  # an empty batch has no drift number, not a zero


# ---------------------------------------------------------------- a monitor on the smoke slice


@pytest.fixture(scope="module")
def smoke_world(smoke_pipeline):
    """What the smoke pipeline delivered: tables, reference, the deployed model's scorer, the plan of batches."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(smoke_pipeline, {}))  # the copy's own store
    tables = load_processed(smoke_pipeline, [*FEATURE_TABLES, "households"])
    pointer = load_json(smoke_pipeline / "models/candidate.json")
    as_of = tables["transactions"].transaction_timestamp.max().normalize()
    plan = plan_batches(tables["campaign_descriptions"], SMOKE["model_development"]["production_from"], as_of)
    score = load_scorer(pointer["model_uri"])
    training = (
        pd.read_parquet(smoke_pipeline / "data/features/development.parquet")
        .query("set == 'train'")
        .reset_index(drop=True)
    )
    references = reference_by_type(
        training,
        score(training[FEATURES]),
        SMOKE["model_development"]["reference_bins"],
        SMOKE["model_monitoring"]["min_reference_households"],
        reference_resampling(SMOKE["model_monitoring"], 42),  # natural drift levels, as the stage derives them
    )
    return {
        "project": smoke_pipeline,
        "tables": tables,
        "reference": references,
        "score": score,
        "pointer": pointer,
        "as_of": as_of,
        "plan": plan,
        "charter": load_json(smoke_pipeline / "data/charter.json"),
    }


def make_monitor(world, tables=None, **settings):
    params = check_params(
        {**copy.deepcopy(SMOKE["model_monitoring"]), **settings}, [k["id"] for k in world["charter"]["kpis"]]
    )
    return Monitor(
        tables or world["tables"],
        world["reference"],
        world["score"],
        {"name": world["pointer"]["name"], "trained_until": SMOKE["model_development"]["train_before"]},
        world["charter"]["kpis"],
        world["charter"]["ml_problem"]["top_k"],
        world["as_of"],
        params,
        seed=42,
    )


def replay_scenario(world, tmp_path, scenario, **settings):
    monitor = make_monitor(world, scenario=scenario, **settings)
    results, computed = replay(
        world["plan"], lambda row: monitor_batch(row, monitor), tmp_path / scenario, {"scenario": scenario}
    )
    return results, evaluate_rules(results, monitor.settings["rules"], world["charter"])


def raised_classes(alerts):
    return {a["remediation"] for a in alerts if a["severity"] in ("warning", "critical")}


@pytest.fixture(scope="module")
def drills(smoke_world, tmp_path_factory):
    """Every scenario replayed on the smoke slice through the lib functions (no DVC run per drill)."""
    base = tmp_path_factory.mktemp("drills")
    return {s: replay_scenario(smoke_world, base, s) for s in SCENARIOS}


@pytest.mark.pipeline
def test_the_real_replay_raises_no_alert(drills):
    results, alerts = drills["none"]
    assert not [a for a in alerts if a["severity"] != "info"], [a["message"] for a in alerts if a["severity"] != "info"]
    assert any(r["status"] == "ok" for r in results)


@pytest.mark.pipeline
@pytest.mark.parametrize(
    "scenario, remediation",
    [
        ("schema_change", "pipeline"),
        ("quality_degradation", "pipeline"),
        ("demographic_shift", "retrain"),
        ("online_shift", "business"),
    ],
)
def test_each_drill_raises_its_remediation_class(drills, scenario, remediation):
    results, alerts = drills[scenario]
    assert remediation in raised_classes(alerts), [a["message"] for a in alerts]
    diagnoses = {diagnose(r, alerts) for r in results} - {"healthy", "insufficient data"}
    assert diagnoses == {remediation}, diagnoses


@pytest.mark.pipeline
def test_broken_batches_are_blocked_before_scoring(drills):
    for scenario in ("schema_change", "quality_degradation"):
        results, _ = drills[scenario]
        assert {r["status"] for r in results} == {"blocked"}
        assert all("max_feature_psi" not in r["metrics"] for r in results)


@pytest.mark.pipeline
def test_online_shift_leaves_the_models_inputs_alone(drills):
    base = {r["batch"]: r["metrics"] for r in drills["none"][0] if r["status"] == "ok"}
    for r in drills["online_shift"][0]:
        if r["status"] == "ok":
            assert r["metrics"]["max_feature_psi"] == base[r["batch"]]["max_feature_psi"]
            assert r["metrics"]["prediction_psi"] == base[r["batch"]]["prediction_psi"]


# ---------------------------------------------------------------- insufficient data


def campaign_with_households(tables, campaign_id, n):
    targeted = tables["campaigns"][tables["campaigns"].campaign_id == campaign_id]
    kept = targeted.head(n)
    return {
        **tables,
        "campaigns": pd.concat(
            [tables["campaigns"][tables["campaigns"].campaign_id != campaign_id], kept], ignore_index=True
        ),
    }


@pytest.mark.pipeline
@pytest.mark.parametrize("households", [0, 3])
def test_empty_and_tiny_batches_report_insufficient_data(smoke_world, households):
    largest = (
        smoke_world["tables"]["campaigns"]
        .query("campaign_id in @smoke_world['plan'].campaign_id")
        .campaign_id.value_counts()
        .index[0]
    )
    row = next(smoke_world["plan"][smoke_world["plan"].campaign_id == largest].itertuples(index=False))
    monitor = make_monitor(smoke_world, tables=campaign_with_households(smoke_world["tables"], largest, households))
    result, scored = monitor_batch(row, monitor)
    assert result["status"] == "insufficient_data" and scored is None
    assert f"{households} targeted household(s)" in result["reason"]
    assert not {"max_feature_psi", "prediction_psi", "roc_auc"} & set(
        result["metrics"]
    )  # no drift number at all, not a zero
    alerts = evaluate_rules([result], monitor.settings["rules"], smoke_world["charter"])
    assert [(a["severity"], a["metric"]) for a in alerts] == [("info", "status")]
    assert "Insufficient data" in alerts[0]["message"] and diagnose(result, alerts) == "insufficient data"


# ---------------------------------------------------------------- incremental replay


@pytest.mark.pipeline
def test_incremental_replay_computes_only_the_new_batch_and_equals_a_full_replay(smoke_world, tmp_path):
    monitor, plan = make_monitor(smoke_world), smoke_world["plan"]
    calls = []

    def monitor_fn(row):
        calls.append(row.batch)
        return monitor_batch(row, monitor)

    replay(plan.iloc[:-1], monitor_fn, tmp_path / "state", {"run": 1})
    calls.clear()
    incremental, computed = replay(plan, monitor_fn, tmp_path / "state", {"run": 1})
    assert computed == calls == [plan.batch.iloc[-1]]
    full, _ = replay(plan, lambda row: monitor_batch(row, monitor), tmp_path / "full", {"run": 1}, incremental=False)

    def strip(results):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in results]

    assert strip(incremental) == strip(full)


# ---------------------------------------------------------------- the stage under DVC


@pytest.mark.pipeline
def test_stage_writes_alerts_metrics_timeline_and_profile(smoke_pipeline):
    alerts = json.loads((smoke_pipeline / "reports/monitoring/alerts.json").read_text())
    assert alerts["scenario"] == "none"
    assert all({"severity", "remediation", "batch", "message"} <= set(a) for a in alerts["alerts"])
    assert not [a for a in alerts["alerts"] if a["severity"] != "info"]
    metrics = json.loads((smoke_pipeline / "metrics/monitoring.json").read_text())
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert (
        metrics["batches"]
        == metrics["batches_ok"] + metrics["batches_blocked"] + metrics["batches_insufficient_data"]
        > 0
    )
    timeline = pd.read_csv(smoke_pipeline / "plots/monitoring_timeline.csv")
    assert len(timeline) == metrics["batches"] and timeline.start_date.is_monotonic_increasing
    assert (smoke_pipeline / "reports/profiles/model_monitoring/reference_vs_latest.html").stat().st_size > 10_000
    assert sorted(p.name for p in (smoke_pipeline / "data/monitoring/batches").glob("*.json")) == [
        f"campaign_{c:03d}.json" for c in sorted(timeline.campaign_id)
    ]


@pytest.mark.pipeline
def test_a_drill_through_dvc_raises_its_class_and_a_rerun_reuses_the_state(smoke_pipeline, tmp_path):
    import shutil

    project = tmp_path / "project"
    shutil.copytree(smoke_pipeline, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model_monitoring"]["scenario"] = "schema_change"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "--single-item", "model_monitoring"], project)
    alerts = json.loads((project / "reports/monitoring/alerts.json").read_text())["alerts"]
    assert raised_classes(alerts) == {"pipeline"}
    assert json.loads((project / "metrics/monitoring.json").read_text())["batches_blocked"] > 0
    run(
        ["dvc", "repro", "--single-item", "--force", "model_monitoring"], project
    )  # forced, nothing changed: every batch is reused
    assert json.loads((project / "data/monitoring/run.json").read_text())["computed"] == []


@pytest.mark.parametrize("age_days, raised", [(365.0, []), (400.0, [("warning", "retrain")])])
def test_a_model_older_than_a_year_raises_a_retrain_alert(age_days, raised):
    params, charter = load_yaml(ROOT / "params.yaml"), load_yaml(ROOT / "charter.yaml")
    healthy = {
        "batch": "campaign 99",
        "campaign_id": 99,
        "start_date": "2018-09-01",
        "status": "ok",
        "metrics": {"model_age_days": age_days, "max_feature_psi": 0.01, "roc_auc": 0.9},
    }
    alerts = evaluate_rules([healthy], params["model_monitoring"]["rules"], charter)
    assert [(a["severity"], a["remediation"]) for a in alerts] == raised
    assert diagnose(healthy, alerts) == ("retrain" if raised else "healthy")


def test_remediation_classes_are_the_whitepapers():
    assert REMEDIATIONS == ("pipeline", "retrain", "business")


# ---------------------------------------------------------------- the closed loop


@pytest.mark.pipeline
def test_a_retrain_diagnosis_trains_a_challenger_and_the_step_04_gate_decides(smoke_world, tmp_path):
    import shutil

    from mlflow import MlflowClient

    from lib.core import connect_mlflow
    from lib.model_monitoring import close_the_loop, gate_settings, retrain_trigger

    project = tmp_path / "project"  # a copy: the registry changes stay in it
    shutil.copytree(smoke_world["project"], project, symlinks=True)
    world = {**smoke_world, "project": project}
    monitor = make_monitor(world, scenario="demographic_shift")
    results, _ = replay(world["plan"], lambda row: monitor_batch(row, monitor), tmp_path / "state", {"loop": 1})
    trigger = retrain_trigger(results, evaluate_rules(results, monitor.settings["rules"], world["charter"]))
    assert trigger is not None
    environ = {"MLFLOW_TRACKING_URI": tracking_uri(project, {})}
    client = MlflowClient(environ["MLFLOW_TRACKING_URI"])
    experiment_id = connect_mlflow(project, environ, SMOKE["shared"]["mlflow_experiment"])
    gate = gate_settings(
        load_json(project / "models/champion.json"), SMOKE["shared"]["enforce_acceptance"], SMOKE["shared"]["seed"]
    )
    outcome = close_the_loop(
        trigger,
        monitor,
        world["pointer"]["name"],
        world["pointer"]["settings"],
        gate,
        world["charter"],
        client,
        experiment_id,
        {"stage": "model_monitoring"},
    )
    assert outcome["trigger"] == trigger["batch"] and outcome["decision"] in ("promoted", "kept", "rejected")
    assert outcome["train_campaigns"] and set(outcome["train_campaigns"]) <= campaigns_ended_before(
        world, trigger["start_date"]
    )
    name = SMOKE["model_deployment"]["registered_model"]
    version = client.get_model_version(name, outcome["version"])
    if outcome["decision"] == "promoted":
        assert client.get_model_version_by_alias(name, "champion").version == version.version
    else:
        assert version.tags["gate"] == outcome["outcome"] and outcome["reasons"]  # keep or reject: the champion stays
        assert client.get_model_version_by_alias(name, "champion").version != version.version


def campaigns_ended_before(world, day):
    cds = world["tables"]["campaign_descriptions"]
    return set(cds.campaign_id[cds.end_date < pd.Timestamp(day)])


# ---------------------------------------------------------------- the champion against the charter's rule


def labelled_batch(i, champion_hits, rule_hits, groups=120) -> dict:
    """A scored, labelled batch result whose (household, campaign) groups each have 3 top-k slots; the champion redeems
    one offer in each of its first `champion_hits` groups, the rule in `rule_hits` groups from the middle on: each
    wins groups the other loses."""
    hits = lambda n, start: np.roll([1] * n + [0] * (groups - n), start).tolist()  # noqa: E731
    return {
        "batch": f"2017-1{i}",
        "campaign_id": 20 + i,
        "start_date": f"2017-1{i}-01",
        "status": "ok",
        "metrics": {"top_k_hits": champion_hits, "rule_top_k_hits": rule_hits},
        "top_k_groups": {
            "champion": hits(champion_hits, 0),
            "rule": hits(rule_hits, groups // 2),
            "slots": [3] * groups,
        },
    }


def rule_alerts(results) -> list:
    compared = compare_with_rule(results, SMOKE["model_monitoring"]["rule_window"], 2000, 42)
    charter = load_yaml(ROOT / "charter.yaml")
    return [
        a
        for a in evaluate_rules(compared, SMOKE["model_monitoring"]["rules"], charter)
        if a["metric"].startswith("rule")
    ]


def test_the_rule_beating_the_champion_with_evidence_raises_a_retrain_alert():
    close = [labelled_batch(i, 30, 32) for i in range(3)]  # the rule a little ahead: no evidence, no alert
    assert rule_alerts(close) == []
    ahead = [labelled_batch(i, 10, 40) for i in range(3)]
    raised = rule_alerts(ahead)
    assert [a["remediation"] for a in raised] == ["retrain"] * 3 and raised[-1]["metric"] == "rule_advantage_low"
    assert "charter's rule puts more redeemed offers" in raised[-1]["message"]
