"""Core helpers: the MLflow store, seeding and output checks, as the stages use them."""

import os
import time

import pytest

import lib.core as core
from lib.core import TrackingStoreError, connect_mlflow, file_sha256, seed_everything, tracking_uri


def test_connect_mlflow_creates_the_experiment_in_the_project_store(tmp_path):
    import mlflow

    experiment_id = connect_mlflow(tmp_path, {}, "demo")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert mlflow.get_experiment(experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert connect_mlflow(tmp_path, {}, "demo") == experiment_id  # a second call finds it
    assert (tmp_path / "mlflow.db").exists()


def test_an_unreachable_tracking_server_fails_fast_with_its_address(tmp_path):
    started = time.monotonic()
    with pytest.raises(TrackingStoreError, match=r"http://127\.0\.0\.1:9 is unreachable"):
        connect_mlflow(tmp_path, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "demo")
    assert time.monotonic() - started < 15


def test_tracking_uri_is_absolute_whatever_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(".", {}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_seeding_and_hashing_are_repeatable(tmp_path):
    assert seed_everything(3).random(4).tolist() == seed_everything(3).random(4).tolist()
    (tmp_path / "a").write_bytes(b"x" * 3_000_000)
    assert file_sha256(tmp_path / "a") == file_sha256(tmp_path / "a")


def kernel_environment(monkeypatch) -> dict:
    "The environment `run_stage` hands the stage's kernel (which inherits `os.environ` when papermill starts it)."
    seen = {}

    def execute(stage, root, parameters, shared):
        seen.update(os.environ)
        raise core.StageError("stopped before the kernel starts")

    monkeypatch.setattr(core, "_execute", execute)
    with pytest.raises(core.StageError, match="stopped before"):
        core.run_stage("business_understanding")
    return seen


def test_a_stage_kernel_inherits_the_memory_settings(monkeypatch):
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "unset below")
    monkeypatch.delenv("MIMALLOC_PURGE_DELAY")  # restored to its former state afterwards
    seen = kernel_environment(monkeypatch)
    assert {k: seen.get(k) for k in core.KERNEL_ENVIRONMENT} == core.KERNEL_ENVIRONMENT


def test_a_memory_setting_the_environment_makes_is_kept(monkeypatch):
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "100")
    assert kernel_environment(monkeypatch)["MIMALLOC_PURGE_DELAY"] == "100"


def test_show_displays_each_figure_as_a_png_and_closes_it(monkeypatch):
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objects: shown.extend(objects))
    figures = [plt.figure(), plt.figure()]
    core.show(*figures)
    assert [type(o).__name__ for o in shown] == ["Image", "Image"]  # not the figures: their text where no backend draws
    assert all(o.data[:4] == b"\x89PNG" for o in shown)
    assert not any(plt.fignum_exists(f.number) for f in figures)
