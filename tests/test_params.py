"""Parameter, charter and notebook-parameter validation: each bad input gets its own clear error."""

import copy

import pytest
import yaml

from conftest import ROOT, run
from lib.core import (
    SHARED_SPEC,
    ParamsError,
    check_notebook_parameters,
    load_params,
    load_yaml,
    merge_params,
    step_notebook,
    validate_spec,
)
from lib.kpis import validate_charter
from lib.model_deployment import SPEC as deployment_spec

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
CHARTER = yaml.safe_load((ROOT / "charter.yaml").read_text())


def charter_with(path, value):
    """The real charter with one entry replaced; `path` is a list of keys and indexes."""
    charter = copy.deepcopy(CHARTER)
    node = charter
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return charter


def test_the_shipped_charter_is_valid():
    assert validate_charter(copy.deepcopy(CHARTER))["ml_problem"]["top_k"] >= 1


@pytest.mark.parametrize(
    "path, value, message",
    [
        (
            ["kpis", 0, "function"],
            "lib.kpis.no_such_kpi",
            "KPI 'store_visit_rate_14d': function 'lib.kpis.no_such_kpi' cannot be found",
        ),
        (["kpis", 0, "function"], "nowhere.module.fn", "cannot be found"),
        (["kpis", 0, "params"], {"window_dayz": 14}, "takes no parameter(s) window_dayz"),
        (["kpis", 1, "target"], "high", "business_understanding.kpis[1].target: expected int or float, got str"),
        (["kpis", 1, "target"], True, "expected int or float, got bool"),
        (["kpis", 0, "alert_threshold"], 0.95, "alert_threshold 0.95 must be below target 0.92"),
        (["kpis", 0, "direction"], "up", "direction must be 'higher' or 'lower'"),
        (["kpis", 0, "owner"], KeyError, "business_understanding.kpis[0].owner: required key is missing"),
        (["kpis", 0, "colour"], "red", "unknown key(s) colour"),
        (["ml_problem", "top_k"], 0, "top_k must be at least 1"),
        (["ml_problem", "acceptance", "roc_auc"], 1.5, "acceptance.roc_auc must lie in [0, 1]"),
        (["ml_problem", "acceptance", "roc_auc_min"], 0.7, "acceptance: unknown metric 'roc_auc_min'"),
        (
            ["ml_problem", "primary_metric"],
            "accuracy",
            "primary_metric must be one of roc_auc, average_precision, precision_at_k",
        ),
    ],
)
def test_charter_errors_name_the_problem(path, value, message):
    with pytest.raises(ParamsError) as err:
        validate_charter(charter_with(path, value))
    assert message in str(err.value)


def test_lower_is_better_kpi_needs_its_alert_threshold_above_target():
    charter = charter_with(["kpis", 0, "direction"], "lower")
    with pytest.raises(ParamsError, match="must be above target"):
        validate_charter(charter)


def test_duplicate_kpi_ids_are_rejected():
    charter = copy.deepcopy(CHARTER)
    charter["kpis"].append(copy.deepcopy(charter["kpis"][0]))
    with pytest.raises(ParamsError, match="KPI ids must be unique"):
        validate_charter(charter)


def write_params(tmp_path, mutate):
    params = copy.deepcopy(PARAMS)
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p["shared"].update(sed=1), "shared: unknown key(s) sed"),
        (lambda p: p["shared"].update(seed="42"), "shared.seed: expected int, got str '42'"),
        (lambda p: p["shared"].pop("kernel"), "shared.kernel: required key is missing"),
        (lambda p: p.update(model_deploymnet={}), "params.yaml: unknown key(s) model_deploymnet"),
        (lambda p: p["shared"].update(cell_timeout_s=0), "shared.cell_timeout_s must be a positive number of seconds"),
        (lambda p: p["shared"].update(cell_timeout_s=-1), "shared.cell_timeout_s must be a positive number of seconds"),
        (lambda p: p["shared"].update(households_sample=-3), "shared.households_sample must be 0 (every household)"),
        (
            lambda p: p.update(business_understanding={}),
            "params.yaml: unknown key(s) business_understanding",
        ),  # the charter has its own file
    ],
)
def test_params_file_errors_name_the_key(tmp_path, mutate, message):
    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path, mutate), "reports", {"title": str})
    assert message in str(err.value)


def test_shared_section_loads():
    assert load_params(ROOT / "params.yaml", "shared", SHARED_SPEC)["seed"] == PARAMS["shared"]["seed"]


def test_the_smoke_overlay_lists_only_what_it_changes_and_merges_over_params():
    overlay = load_yaml(ROOT / "tests/smoke/params.yaml")
    merged = merge_params(PARAMS, overlay, where="smoke")
    assert merged["shared"]["households_sample"] > 0 and merged["shared"]["enforce_acceptance"] is False
    assert (
        merged["shared"]["seed"] == PARAMS["shared"]["seed"]
        and merged["model_monitoring"]["rules"] == PARAMS["model_monitoring"]["rules"]
    )
    assert len((ROOT / "tests/smoke/params.yaml").read_text().splitlines()) <= 30  # an overlay, not a copy
    for section, spec in (("shared", SHARED_SPEC), ("model_deployment", deployment_spec)):
        validate_spec(merged[section], spec, where=section)


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"shared": {"households_sampel": 150}}, "smoke.shared: unknown key(s) households_sampel"),
        ({"model_devlopment": {}}, "smoke: unknown key(s) model_devlopment"),
        (
            {"model_development": {"gradient_boosting": {"max_depth": [3]}}},
            "smoke.model_development.gradient_boosting: unknown key(s) max_depth",
        ),
    ],
)
def test_an_unknown_key_in_an_overlay_is_an_error_naming_it(overlay, message):
    with pytest.raises(ParamsError) as err:
        merge_params(PARAMS, overlay, where="smoke")
    assert message in str(err.value)


def test_notebook_parameters_are_checked_not_warned():
    notebook = step_notebook("business_understanding", ROOT)
    with pytest.raises(ParamsError, match="unknown parameter 'param_file'"):
        check_notebook_parameters(notebook, {"param_file": "params.yaml"})
    with pytest.raises(ParamsError, match="parameter 'params_file': expected str, got int"):
        check_notebook_parameters(notebook, {"params_file": 7})


def test_run_stage_rejects_unknown_stage_and_parameter():
    bad_stage = run(["run-stage", "business_understandin"], ROOT, check=False)
    assert bad_stage.returncode != 0 and "STAGE is one of" in bad_stage.stderr
    bad_param = run(["run-stage", "business_understanding", "param_file=params.yaml"], ROOT, check=False)
    assert bad_param.returncode != 0 and "unknown parameter 'param_file'" in bad_param.stderr
