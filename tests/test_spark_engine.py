"""The Spark engine: its session fails clearly without Java or with a master that does not answer; on the smoke slice
it builds the same feature table, the same scores and the same send list as the pandas engine, in local mode and on a
standalone cluster of a master and two workers, and a monitoring batch and its drill give the same rows and results;
a few campaigns' rows are sorted once read, many by Spark; and a Python worker killed while features are written fails
the write without leaving output, after which a rerun on the cluster gives the pandas answers. Steps 03 to 05 run
through DVC on Spark in test_spark_pipeline.py (03) and test_spark_deployment.py (04, 05)."""

import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pyspark
import pytest
from mlflow import MlflowClient

from conftest import ROOT, SPARK_LOCAL, assert_close, wait_until
from lib import model_deployment as dep
from lib import model_development as md
from lib import model_monitoring as mon
from lib.core import SparkUnavailableError, load_json, load_params, load_yaml, spark_session, stop_engine, vm_options
from lib.data_acquisition import load_processed

CAMPAIGNS = [16, 17, 18]  # the smoke slice's gate campaigns and the target campaign of step 04
TOP_K = 3
SPARK_HOME = Path(pyspark.__file__).parent  # pyspark's own distribution: bin/spark-class, jars/
FAULTS = Path(__file__).parent / "spark_faults"  # pyspark_stall_worker, a Python worker that waits to be killed


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


# First of the tests that start a session: the JVM it starts last is the one the `spark` fixture then reuses.
def test_a_stage_done_with_spark_lets_its_jvm_and_python_workers_go():
    session = spark_session(SPARK_LOCAL)
    assert session.range(8).rdd.map(lambda x: x).count() == 8  # a Python job: the workers start
    jvm = psutil.Process(pyspark.SparkContext._gateway.proc.pid)
    workers = jvm.children(recursive=True)
    assert workers, "a Python job ran, so the JVM has Python workers"
    stop_engine(session)
    gone, alive = psutil.wait_procs([jvm, *workers], timeout=120)
    assert not alive, f"still running after stop_engine: {[p.pid for p in alive]}"
    again = spark_session(SPARK_LOCAL)  # a later session starts a JVM of its own
    try:
        assert again.range(5).count() == 5
    finally:
        again.stop()


def test_a_second_session_with_other_settings_gets_them(spark):
    settings = {"master": "local[1]", "config": {"spark.sql.shuffle.partitions": 3}}
    again = spark_session(settings)
    try:
        conf = again.sparkContext.getConf()
        assert (conf.get("spark.master"), conf.get("spark.sql.shuffle.partitions")) == ("local[1]", "3")
        assert spark.sparkContext._jsc is None  # the first session was stopped, not returned unchanged
        assert spark_session(settings) is again  # the same settings: the running session is kept
    finally:
        again.stop()


def test_the_driver_jvm_runs_with_the_settings_that_give_idle_heap_back(spark):
    arguments = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    assert {"-XX:G1PeriodicGCInterval=3000", "-XX:MaxHeapFreeRatio=20"} <= set(arguments), arguments


def _heap_mb(spark) -> tuple:
    "The driver JVM's committed and used heap, in MB."
    usage = spark._jvm.java.lang.management.ManagementFactory.getMemoryMXBean().getHeapMemoryUsage()
    return usage.getCommitted() / 2**20, usage.getUsed() / 2**20


def test_a_written_output_leaves_the_driver_holding_no_more_heap_than_it_uses(spark, tmp_path, monkeypatch):
    bean = vm_options(spark._jvm)
    own = {"MaxHeapFreeRatio": "60", "MinHeapFreeRatio": "30"}  # a user's own bounds, looser than SPARK_DEFAULTS'
    session = {key: bean.getVMOption(key).getValue() for key in own}  # the session's, back for the next tests
    grown, release = [], md.release_driver_heap

    def heap_read_then_released(session):  # the committed heap the job grew, read just before the release
        grown.append(_heap_mb(session)[0])
        release(session)

    monkeypatch.setattr(md, "release_driver_heap", heap_read_then_released)
    for key, value in own.items():
        bean.setVMOption(key, value)
    try:
        shuffled = spark.range(0, 3_000_000, numPartitions=2).selectExpr("id", "uuid() AS u").orderBy("u")
        md.write_parquet_atomically(shuffled, tmp_path / "released")
        assert grown and grown[0] > 400, f"the job grew the heap to {grown} MB only: nothing to give back"
        committed, used = _heap_mb(spark)
        print(f"heap: grown {grown[0]:.0f} MB, after the release {committed:.0f} MB committed, {used:.0f} MB used")
        assert committed < grown[0] / 2 and committed <= used / 0.8 + 64, (grown, committed, used)
        assert {key: bean.getVMOption(key).getValue() for key in own} == own  # the JVM's own bounds again
    finally:
        for key in reversed(session):
            bean.setVMOption(key, session[key])


@pytest.fixture
def spark():
    session = spark_session(SPARK_LOCAL)
    yield session
    session.stop()


def _scores_both_ways(spark, model_uri, rows, features_path, out):
    on_pandas = dep.predict_scores(mlflow.pyfunc.load_model(model_uri), rows)
    on_spark = pd.read_parquet(dep.spark_scores(spark, spark.read.parquet(str(features_path)), model_uri, out))
    on_spark = on_spark.sort_values(md.KEYS, ignore_index=True)
    return rows[md.KEYS].assign(score=on_pandas), on_spark


def _promo_weeks(project) -> int:
    return load_yaml(project / "params.yaml")["model_development"]["promo_weeks"]


def _rows_on_pandas(project):
    "The labelled rows of `CAMPAIGNS` built by the pandas engine, and the `promo_weeks` of the project."
    promo_weeks = _promo_weeks(project)
    return md.build_labelled_rows(load_processed(project, md.FEATURE_TABLES), CAMPAIGNS, promo_weeks), promo_weeks


def _features_on_spark(spark, project, out, promo_weeks):
    small, transactions, promotions = md.spark_tables(spark, project)
    return md.spark_features(spark, small, transactions, promotions, CAMPAIGNS, out, promo_weeks, 8, labelled=True)


def _assert_same_features(features_path, on_pandas):
    on_spark = pd.read_parquet(features_path).sort_values(md.KEYS, ignore_index=True)
    pd.testing.assert_frame_equal(on_spark, on_pandas, check_exact=True)  # same values, same dtypes
    assert not list(features_path.parent.glob(f".{features_path.name}.*"))  # the temporary folder was renamed


def _assert_same_answers(spark, project, tmp_path):
    "On `spark`: the same features as pandas, and scores and send lists of the champion and candidate as pandas'."
    on_pandas, promo_weeks = _rows_on_pandas(project)
    features_path = _features_on_spark(spark, project, tmp_path / "features", promo_weeks)
    _assert_same_features(features_path, on_pandas)

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
def test_spark_features_scores_and_send_list_equal_the_pandas_ones(deployed_smoke, spark, tmp_path):
    _assert_same_answers(spark, deployed_smoke, tmp_path)


def _with_jobs(spark, group, call) -> tuple:
    "What `call()` returns, and how many Spark jobs it ran (tagged with job group `group`)."
    spark.sparkContext.setJobGroup(group, group)
    try:
        out = call()
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    return out, len(spark.sparkContext.statusTracker().getJobIdsForGroup(group))


@pytest.mark.pipeline
def test_few_campaigns_rows_are_sorted_after_reading_and_many_by_spark(deployed_smoke, spark):
    """`labelled_rows` on Spark gives the pandas rows in key order either way; sorting `many` rows on Spark (a
    retraining's) takes more jobs than sorting a few campaigns' rows once they are read (the range partitioning's
    sample and shuffle), which step 04's gate and each monitoring batch are spared."""
    on_pandas, promo_weeks = _rows_on_pandas(deployed_smoke)
    build = functools.partial(
        md.labelled_rows,
        md.feature_tables(deployed_smoke, spark),
        CAMPAIGNS,
        promo_weeks,
        spark=spark,
        root=deployed_smoke,
    )
    built = {many: _with_jobs(spark, f"many={many}", functools.partial(build, many=many)) for many in (False, True)}
    for rows, _ in built.values():
        pd.testing.assert_frame_equal(rows, on_pandas, check_exact=True)
    assert built[True][1] > built[False][1] > 0, {many: jobs for many, (_, jobs) in built.items()}


def _monitor_on_pandas(project):
    "Step 05's monitor of `project` as its run cells build it on the pandas engine, and the replay's plan of batches."
    charter, seed = load_json(project / "data/charter.json"), load_yaml(project / "params.yaml")["shared"]["seed"]
    kpi_ids = [k["id"] for k in charter["kpis"]]
    params = mon.check_params(load_params(project / "params.yaml", "model_monitoring", mon.SPEC), kpi_ids)
    settings = md.development_settings(load_json(project / "models/candidate.json"))
    tables = load_processed(project, [*md.FEATURE_TABLES, "households"])
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    deployed = mon.deployed_model(project)
    training = pd.read_parquet(project / "data/features/development.parquet").query("set == 'train'")
    score = mon.load_scorer(mon.scoring_uri(deployed))
    m = mon.build_monitor(tables, training.reset_index(drop=True), score, deployed, charter, params, settings, seed)
    plan = mon.plan_batches(tables["campaign_descriptions"], settings["production_from"], m.as_of, "")
    return m, plan


def _kept(monkeypatch, name) -> list:
    "The frames that `lib.model_development.<name>` (called by step 05 through `labelled_rows`) returns from now on."
    real, frames = getattr(md, name), []

    def keeping(*args, **kwargs):
        frames.append(real(*args, **kwargs))
        return frames[-1]

    monkeypatch.setattr(md, name, keeping)
    return frames


@pytest.mark.pipeline
def test_a_monitoring_batch_and_its_drill_on_spark_give_the_pandas_rows_and_results(deployed_smoke, spark, monkeypatch):
    """A labelled production batch of the smoke slice, and its demographic-shift drill (which retargets the batch: the
    features must see the drilled targeting), give the same labelled rows, scores and batch results on both engines; the
    Spark monitor holds only the small tables and reads each batch's transactions from the delivered file. The batch
    the pandas run judged, rebuilt on Spark through DVC: tests/test_spark_deployment.py."""
    on_pandas, plan = _monitor_on_pandas(deployed_smoke)
    small = md.feature_tables(deployed_smoke, spark) | load_processed(deployed_smoke, ["households"])
    on_spark = dataclasses.replace(on_pandas, tables=small, spark=spark, root=deployed_smoke)  # as step 05 holds them
    drill = {**on_pandas.settings, "scenario": "demographic_shift"}
    labelled = plan[plan.labelled].head(1)
    cases = [
        (on_pandas, on_spark, labelled),
        (dataclasses.replace(on_pandas, settings=drill), dataclasses.replace(on_spark, settings=drill), labelled),
    ]
    rows = {"pandas": _kept(monkeypatch, "build_labelled_rows"), "spark": _kept(monkeypatch, "labelled_rows_on_spark")}
    built = 0
    for m_pandas, m_spark, batches in cases:
        for row in batches.itertuples():
            (want, want_scored), (got, got_scored) = (mon.monitor_batch(row, m) for m in (m_pandas, m_spark))
            assert want["status"] != "blocked", want["reason"]  # every case builds features
            built += 1
            assert len(rows["pandas"]) == len(rows["spark"]) == built  # each engine built this batch's rows itself
            pd.testing.assert_frame_equal(rows["spark"][-1], rows["pandas"][-1], check_exact=True)
            assert_close(*({k: v for k, v in r.items() if k != "seconds"} for r in (got, want)), row.batch)
            if want_scored is not None:
                keys = (
                    got_scored.sort_values(md.KEYS, ignore_index=True),
                    want_scored.sort_values(md.KEYS, ignore_index=True),
                )
                pd.testing.assert_frame_equal(*(k.drop(columns="prediction") for k in keys), check_exact=True)
                assert np.abs(keys[0].prediction.to_numpy() - keys[1].prediction.to_numpy()).max() <= 1e-9
    assert built == 2 and plan.labelled.any()
    drilled = mon.drilled_batch(cases[1][0], labelled.campaign_id.iloc[0])["campaigns"].household_id
    assert set(rows["spark"][-1].household_id) == set(drilled)  # the drill's households, not the delivered ones


def _answers(address) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=1):
        return True
    return False


def _alive_workers(webui) -> int:
    "The number of ALIVE workers that the master's web UI reports (0 while it does not answer)."
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"http://127.0.0.1:{webui}/json/", timeout=2) as answer:
            return sum(w["state"] == "ALIVE" for w in json.load(answer)["workers"])
    return 0


def _stop_process_groups(procs, timeout_s=30):
    "Stop each of `procs` with its process group and every descendant (executors, Python daemons); returns survivors."
    family = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            family += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # each was started in a session of its own: its group id is its pid
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(sig)
        _, alive = psutil.wait_procs(family, timeout=timeout_s)
        if not alive:
            break
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    return [p for p in family if _running(p)]


def _running(process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    """A standalone Spark cluster on 127.0.0.1 from pyspark's own distribution, a master and two one-core workers,
    once the master's web UI counts both workers ALIVE; every process of it is stopped afterwards."""
    tmp = tmp_path_factory.mktemp("cluster")
    env = os.environ | {
        "SPARK_HOME": str(SPARK_HOME),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(tmp / "logs"),
        "SPARK_WORKER_DIR": str(tmp / "work"),
        "SPARK_DAEMON_MEMORY": "256m",  # the master and worker daemons; executors get spark.executor.memory
    }
    port, webui = _free_port(), _free_port()
    master = f"spark://127.0.0.1:{port}"
    commands = {
        "master": ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port)],
        **{
            f"worker{i}": ["org.apache.spark.deploy.worker.Worker", master, "--host", "127.0.0.1", "--cores", "1"]
            + ["--memory", "1g"]
            for i in (1, 2)
        },
    }
    procs = {}
    try:
        for name, args in commands.items():
            with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own descriptor
                procs[name] = subprocess.Popen(
                    [
                        str(SPARK_HOME / "bin/spark-class"),
                        *args,
                        "--webui-port",
                        str(webui if name == "master" else _free_port()),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if name == "master":
                wait_until(
                    f"master answering on port {port}", lambda: _answers(("127.0.0.1", port)), 120, [procs["master"]]
                )
        wait_until("2 ALIVE workers", lambda: _alive_workers(webui) == 2, 120, procs.values())
        yield types.SimpleNamespace(master=master, procs=procs, logs=tmp)
    finally:
        left = _stop_process_groups(list(procs.values()))
        assert not left, f"processes of the cluster still running: {[p.cmdline()[:3] for p in left]}"


@contextlib.contextmanager
def cluster_session(cluster, **config):
    "A SparkSession with the standalone `cluster` as master (and `config`), the process's other session stopped."
    from pyspark.sql import SparkSession

    if (active := SparkSession.getActiveSession()) is not None:
        active.stop()
    settings = {
        "spark.sql.shuffle.partitions": 4,
        "spark.driver.host": "127.0.0.1",  # executors call the driver back here
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.enabled": False,
        "spark.executor.memory": "512m",
        # SparkSession.builder keeps the options of the process's earlier sessions: the fault test's are reset here
        "spark.task.maxFailures": 4,
        "spark.python.worker.reuse": True,
        "spark.python.worker.module": "pyspark.worker",
        "spark.executorEnv.STALL_WHEN": "",
    }
    session = spark_session({"master": cluster.master, "config": settings | config})
    try:
        yield session
    finally:
        session.stop()


def _executor_pythons(spark) -> set:
    "The Python interpreters of the executors' workers, with one task per worker core."
    return set(spark.sparkContext.parallelize(range(4), 4).map(lambda _: sys.executable).collect())


def _cluster_descendants(cluster) -> set:
    return {p.pid for w in cluster.procs.values() for p in psutil.Process(w.pid).children(recursive=True)}


@pytest.mark.pipeline
def test_a_python_worker_killed_while_features_are_written_fails_the_write_and_a_rerun_gives_pandas_answers(
    deployed_smoke, standalone_cluster, tmp_path
):
    """Every Python worker of the write stage waits, once the write's temporary folder exists; one is killed: with one
    attempt per task the job fails, and no features folder is left (nor its temporary one). The rerun, on the same
    standalone cluster with an executor on each worker, gives the features, scores and send list of the pandas
    engine."""
    promo_weeks = _promo_weeks(deployed_smoke)
    out, markers = tmp_path / "features", tmp_path / "stalled"
    markers.mkdir()
    stalling = {
        "spark.task.maxFailures": 1,
        "spark.python.worker.reuse": False,  # a reused worker enters its main before its next task is assigned
        "spark.python.worker.module": "pyspark_stall_worker",
        "spark.executorEnv.PYTHONPATH": str(FAULTS),
        "spark.executorEnv.STALL_WHEN": str(tmp_path / f".{out.name}.writing-*"),
        "spark.executorEnv.STALL_MARKERS": str(markers),
    }
    with cluster_session(standalone_cluster, **stalling) as spark, ThreadPoolExecutor(1) as pool:
        writing = pool.submit(_features_on_spark, spark, deployed_smoke, out, promo_weeks)

        def stalled():
            if writing.done():
                raise AssertionError(f"the write ended before any worker stalled: {writing.exception()!r}")
            return next((int(m.name) for m in markers.iterdir() if m.name.isdigit()), None)

        pid = wait_until("a Python worker stalled in the write stage", stalled, 300, standalone_cluster.procs.values())
        assert pid in _cluster_descendants(standalone_cluster)  # a real Python worker under a worker's executor
        psutil.Process(pid).kill()
        with pytest.raises(Exception, match="failed 1 times") as failure:
            writing.result(timeout=300)
    assert "Python worker exited unexpectedly" in str(failure.value) or "crashed" in str(failure.value)
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}.*"))  # the temporary folder of the failed write was removed

    with cluster_session(standalone_cluster) as spark:
        assert spark.sparkContext.master == standalone_cluster.master
        assert _executor_pythons(spark) == {sys.executable}  # the project's Python (PYSPARK_PYTHON) on the executors
        status = spark.sparkContext._jsc.sc().getExecutorMemoryStatus  # the driver and each executor
        wait_until("an executor on each worker", lambda: status().size() == 3, 120, standalone_cluster.procs.values())
        _assert_same_answers(spark, deployed_smoke, tmp_path)  # writes the features to `out` again
