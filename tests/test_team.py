"""Team scale, for real on 127.0.0.1: `team-stack up` (`make team-up`) starts PostgreSQL and `mlflow server` with
proxied artifacts; one smoke run of the pipeline (teammate A) reads its data from a password-protected PostgreSQL
warehouse, logs to the server and pushes to the default DVC remote; teammate B clones, pulls and scores with @champion.
One stack and one pipeline run serve the whole module; `team-stack down` stops the stack."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, make_project_copy, project_env, run
from lib.core import TrackingStoreError, connect_mlflow, load_json, load_yaml, quiet
from lib.data_acquisition import TABLES, sample_households
from lib.sources import package_source
from lib.team import RESTRICTED_FILES, answers_health, pg_ready, start_postgres, stop_postgres, team_settings

pytestmark = pytest.mark.pipeline


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def team_environment(base: Path) -> dict:
    """Settings of a stack of its own in `base`: free ports, its data, artifacts and password outside any project."""
    return {
        "TEAM_DIR": str(base / "team"),
        "TEAM_PG_DATA": str(base / "postgres"),
        "TEAM_PG_PORT": str(free_port()),
        "TEAM_MLFLOW_PORT": str(free_port()),
        "TEAM_ARTIFACTS": str(base / "artifacts"),
    }


@pytest.fixture(scope="module")
def team_stack():
    # The postgres user that PostgreSQL runs as (when the tests run as root) must reach its data folder: not under
    # pytest's tmp folder, which is private to the user running the tests.
    base = Path(tempfile.mkdtemp(prefix="team-stack-", dir="/tmp"))
    base.chmod(0o711)
    env = team_environment(base)
    started = time.monotonic()
    up = run(["team-stack", "up"], ROOT, env=env, timeout=900)
    stack = SimpleNamespace(
        env=env,
        base=base,
        settings=team_settings(ROOT, env),
        uri=f"http://127.0.0.1:{env['TEAM_MLFLOW_PORT']}",
        up=up.stdout,
        startup_s=time.monotonic() - started,
    )
    yield stack
    run(["team-stack", "down"], ROOT, env=env, check=False, timeout=120)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def on_server(team_stack):
    """The test process's MLflow pointed at the team server, and back at nothing afterwards."""
    import mlflow

    yield {**project_env(), "MLFLOW_TRACKING_URI": team_stack.uri}
    mlflow.set_tracking_uri(None)


def test_team_up_starts_both_servers_on_loopback_and_prints_the_uri_to_export(team_stack):
    assert f"export MLFLOW_TRACKING_URI={team_stack.uri}" in team_stack.up
    assert pg_ready(team_stack.settings) and answers_health(team_stack.uri)
    pid = int((Path(team_stack.env["TEAM_DIR"]) / "mlflow.pid").read_text())
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert command[command.index(b"--host") + 1] == b"127.0.0.1"
    print(f"team stack up in {team_stack.startup_s:.1f} s")


def test_the_password_stays_in_a_private_file_and_out_of_commands_and_logs(team_stack):
    passfile = Path(team_stack.env["TEAM_DIR"]) / "pgpass"
    assert passfile.stat().st_mode & 0o777 == 0o600
    password = passfile.read_text().strip().rsplit(":", 1)[1]
    assert len(password) >= 24
    pid = int((Path(team_stack.env["TEAM_DIR"]) / "mlflow.pid").read_text())
    assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert password not in team_stack.up
    assert password not in (Path(team_stack.env["TEAM_DIR"]) / "mlflow.log").read_text()


def test_a_second_team_up_finds_the_stack_running(team_stack):
    again = run(["team-stack", "up"], ROOT, env=team_stack.env, timeout=120)
    assert "PostgreSQL already answers" in again.stdout and "MLflow server already answers" in again.stdout


def test_a_password_in_the_database_url_is_refused_before_anything_starts(tmp_path):
    env = {"TEAM_DIR": str(tmp_path), "TEAM_DATABASE_URL": "postgresql+psycopg://ml:hunter2@127.0.0.1:9/mlflow"}
    refused = run(["team-stack", "up"], ROOT, env=env, check=False, timeout=120)
    assert refused.returncode != 0 and "PGPASSWORD or ~/.pgpass" in refused.stderr
    assert "hunter2" not in refused.stdout + refused.stderr


def test_experiments_on_the_server_keep_artifacts_behind_it(team_stack, on_server, tmp_path):
    import mlflow

    experiment_id = connect_mlflow(tmp_path, on_server, "proxied")
    assert mlflow.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
    with mlflow.start_run(experiment_id=experiment_id) as started:
        mlflow.log_text("proxied", "note.txt")
    assert started.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list(Path(team_stack.env["TEAM_ARTIFACTS"]).rglob("note.txt"))
    assert [p.read_text() for p in stored] == ["proxied"]
    assert not (tmp_path / "mlartifacts").exists()


def test_an_experiment_with_a_local_artifact_folder_on_the_server_is_refused(team_stack, on_server, tmp_path):
    from mlflow import MlflowClient

    MlflowClient(team_stack.uri).create_experiment("local-folder", artifact_location=(tmp_path / "a").as_uri())
    with pytest.raises(TrackingStoreError, match="local folder .* teammates cannot read"):
        connect_mlflow(tmp_path, on_server, "local-folder")
    with pytest.raises(ValueError, match="local folder"):
        connect_mlflow(tmp_path, {**on_server, "MLFLOW_ARTIFACT_LOCATION": str(tmp_path)}, "another")


SMOKE = load_yaml(ROOT / "tests/smoke/params.yaml")
PROMOTION_ROWS = 50_000  # the warehouse keeps the first promotion rows only: loading all 20.9M would take minutes


def stack_password(stack) -> str:
    return (Path(stack.env["TEAM_DIR"]) / "pgpass").read_text().strip().rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def warehouse(team_stack):
    """The smoke slice's households in a PostgreSQL database `warehouse` on the stack's server; its URL holds the
    password, as a company warehouse URL may."""
    import psycopg
    import sqlalchemy

    password, port = stack_password(team_stack), team_stack.env["TEAM_PG_PORT"]
    with psycopg.connect(f"host=127.0.0.1 port={port} user=mlflow dbname=mlflow password={password}") as c:
        c.autocommit = True
        c.execute("CREATE DATABASE warehouse")
    src = package_source()
    tables = {t: pd.read_parquet(src.files[t]) for t in TABLES if t != "promotions"}
    tables["promotions"] = next(pq.ParquetFile(src.files["promotions"]).iter_batches(PROMOTION_ROWS)).to_pandas()
    keep = sample_households(tables["transactions"].household_id, SMOKE["shared"]["households_sample"], 42)
    url = f"postgresql+psycopg://mlflow:{password}@127.0.0.1:{port}/warehouse"
    engine = sqlalchemy.create_engine(url)
    for name, frame in tables.items():
        frame = frame[frame.household_id.isin(keep)] if "household_id" in frame else frame
        frame.to_sql(name, engine, index=False, chunksize=20_000)
    engine.dispose()
    return SimpleNamespace(url=url, password=password)


@pytest.fixture(scope="module")
def teammate_a(team_stack, warehouse):
    """Teammate A's clone: the smoke slice from the warehouse, run against the team server, committed and pushed."""
    base = team_stack.base / "clones"
    overlay = {
        **SMOKE,
        "data_acquisition": {**SMOKE["data_acquisition"], "source": {"kind": "sql", "url_env": "WH_URL"}},
    }
    (team_stack.base / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    project = make_project_copy(base / "a", overlay=team_stack.base / "overlay.yaml")
    env = {"MLFLOW_TRACKING_URI": team_stack.uri, "WH_URL": warehouse.url}
    started = time.monotonic()
    repro = run(["dvc", "repro"], project, env=env)
    seconds = time.monotonic() - started
    print(f"smoke pipeline against the team stack: {seconds:.0f} s")
    run("git add -A && git -c user.name=a -c user.email=a@a commit -qm 'a run'", project)
    push = run(["dvc", "push"], project, env=env)
    return SimpleNamespace(
        project=project, env=env, repro=repro, push=push, seconds=seconds, remote=base / "dvc-remote"
    )


def test_a_run_against_the_server_keeps_every_artifact_behind_it(team_stack, teammate_a):
    from mlflow import MlflowClient

    project = teammate_a.project
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()
    client = MlflowClient(team_stack.uri)
    champion = load_json(project / "models/champion.json")
    assert client.get_model_version_by_alias(champion["name"], "champion").version == str(champion["version"])
    experiment = client.get_experiment_by_name(SMOKE["shared"]["mlflow_experiment"])
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    assert list(Path(team_stack.env["TEAM_ARTIFACTS"]).rglob("MLmodel"))  # the models are in the server's store
    assert load_json(project / "data/catalog.json")["source"].startswith("sql postgresql+psycopg://mlflow:***@")


def test_development_runs_leave_the_production_model_and_experiment_alone(team_stack, teammate_a):
    """The smoke overlay names a registered model and an experiment of its own: production's @champion never moves."""
    from mlflow import MlflowClient

    production = load_yaml(ROOT / "params.yaml")
    client = MlflowClient(team_stack.uri)
    assert SMOKE["model_deployment"]["registered_model"] != production["model_deployment"]["registered_model"]
    assert not client.search_registered_models(f"name = '{production['model_deployment']['registered_model']}'")
    assert client.get_experiment_by_name(production["shared"]["mlflow_experiment"]) is None


def _files(folder: Path):
    return (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def test_the_warehouse_password_shows_in_no_output(team_stack, warehouse, teammate_a):
    """Every file of the clone (executed notebooks, pages, profiles, catalog, logs, DVC cache, git), the remote, the
    server's artifacts and log, the terminal output, and every MLflow record."""
    from mlflow import MlflowClient

    secret = warehouse.password.encode()
    places = [teammate_a.project, teammate_a.remote, Path(team_stack.env["TEAM_ARTIFACTS"])]
    leaks = [str(p) for folder in places for p in _files(folder) if secret in p.read_bytes()]
    log = (Path(team_stack.env["TEAM_DIR"]) / "mlflow.log").read_bytes()
    terminal = (teammate_a.repro.stdout + teammate_a.repro.stderr + teammate_a.push.stdout).encode()
    leaks += [name for name, text in {"mlflow.log": log, "dvc output": terminal}.items() if secret in text]
    client = MlflowClient(team_stack.uri)
    for experiment in client.search_experiments():
        for r in client.search_runs([experiment.experiment_id]):
            leaks += [f"run {r.info.run_id}" for v in (r.data.params, r.data.tags) if warehouse.password in str(v)]
    for model in client.search_registered_models():
        leaks += [
            f"model {model.name}"
            for v in client.search_model_versions(f"name = '{model.name}'")
            if warehouse.password in str(v)
        ]
    assert not leaks, f"the password shows in: {leaks}"
    assert (teammate_a.project / "reports/html/02_data_acquisition.html").exists()


def test_contact_details_stay_private_and_never_reach_the_cache_or_the_remote(teammate_a):
    project = teammate_a.project
    restricted = [project / "data/raw/contacts.parquet", *(project / "data/delivery").iterdir()]
    assert restricted and all(p.stat().st_mode & 0o777 == 0o600 for p in restricted)
    email = pd.read_parquet(project / "data/raw/contacts.parquet").email.iloc[0].encode()
    stored = [p for folder in (project / ".dvc/cache", teammate_a.remote) for p in _files(folder)]
    assert stored and not [str(p) for p in stored if email in p.read_bytes()]  # the delivery CSV holds it in clear
    digests = {hashlib.md5(p.read_bytes()).hexdigest() for p in restricted}  # DVC stores files under their md5
    assert not [str(p) for p in stored if p.parent.name + p.name in digests]
    for path in ("data/raw/contacts.parquet", "data/delivery/send_list_with_contacts.csv"):
        assert run(["git", "check-ignore", "-q", path], project, check=False).returncode == 0, f"{path} not ignored"
    assert not run(["git", "ls-files", "data/raw", "data/delivery"], project).stdout  # and never committed


def _paths(change) -> list:
    """The paths of one entry of `dvc status --json` ({"changed outs": {path: state}}, or a plain string)."""
    return [path for inner in change.values() for path in inner] if isinstance(change, dict) else [change]


def score_target_campaign(project: Path, uri: str) -> pd.DataFrame:
    """Step 04's batch scoring of the target campaign, with `models:/<name>@champion` loaded from the server."""
    import mlflow

    from lib import model_development as md
    from lib.data_acquisition import load_processed
    from lib.model_deployment import prepare_campaign, score_campaign

    params = load_yaml(project / "params.yaml")["model_deployment"]
    settings = md.development_settings(load_json(project / "models/candidate.json"))
    processed = load_processed(project)
    tables = {t: processed[t] for t in md.FEATURE_TABLES}
    mlflow.set_tracking_uri(uri)
    try:
        scorer = mlflow.pyfunc.load_model(f"models:/{params['registered_model']}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    target = prepare_campaign(tables, params["target_campaign"], settings["promo_weeks"])
    return score_campaign(target, None, scorer, params["chunk_households"])[0]


@pytest.fixture(scope="module")
def teammate_b(team_stack, teammate_a):
    """Teammate B: a git clone of A's repository, `dvc pull` from the default remote (beside both clones), and the
    restricted contact files rebuilt from the warehouse."""
    b = team_stack.base / "clones/b"
    run(["git", "clone", "-q", str(teammate_a.project), str(b)], b.parent)
    run(["dvc", "pull"], b, env={"MLFLOW_TRACKING_URI": team_stack.uri})
    restored = run(["restore-restricted"], b, env=teammate_a.env)  # B reads the warehouse A read
    print("restore-restricted printed:\n" + restored.stdout)
    return b


def test_a_teammate_clone_pulls_then_finds_nothing_to_recompute_and_scores_as_the_first(
    team_stack, teammate_a, teammate_b
):
    status = json.loads(
        run(["dvc", "status", "--json"], teammate_b, env={"MLFLOW_TRACKING_URI": team_stack.uri}).stdout
    )
    changed = {  # the source fingerprint runs at every repro by design ("always changed"): it recomputes nothing
        entry for stage in status.values() for change in stage if change != "always changed" for entry in _paths(change)
    }
    assert not changed, f"B would recompute: {status}"
    for path in RESTRICTED_FILES:  # rebuilt on B's machine, byte for byte A's, and as private
        assert (teammate_b / path).read_bytes() == (teammate_a.project / path).read_bytes()
        assert (teammate_b / path).stat().st_mode & 0o777 == 0o600
    scores = score_target_campaign(teammate_b, team_stack.uri)
    expected = pd.read_parquet(teammate_a.project / "data/scored/scores.parquet")
    pd.testing.assert_frame_equal(scores, expected[scores.columns])


# ---------------------------------------------------------------- faults of the team stack


def champion_state(uri, name) -> tuple:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client.get_model_version_by_alias(name, "champion").version, len(
        client.search_model_versions(f"name = '{name}'")
    )


def test_a_stopped_database_stops_a_stage_at_once_naming_it(team_stack, teammate_b):
    name = SMOKE["model_deployment"]["registered_model"]
    before = champion_state(team_stack.uri, name)
    stop_postgres(team_stack.settings, say=quiet)
    try:
        env = {"MLFLOW_TRACKING_URI": team_stack.uri}
        failed = run(["dvc", "repro", "-f", "-s", "model_deployment"], teammate_b, env=env, check=False, timeout=600)
    finally:
        start_postgres(team_stack.settings, {**os.environ, **team_stack.env}, say=quiet)
    printed = failed.stdout + failed.stderr
    print("PostgreSQL stopped, dvc repro printed:\n" + "\n".join(printed.strip().splitlines()[-6:]))
    assert failed.returncode != 0
    assert f"MLflow tracking server {team_stack.uri} answers, but not its backend store" in printed
    assert champion_state(team_stack.uri, name) == before


def insert_waiting_cell(project, signals, before="tags = lineage_tags("):
    """A cell in step 03 just before it connects to MLflow: it writes `signals/started` and waits (bounded) for
    `signals/release`, so the test acts while the stage runs. Returns the two paths."""
    notebook = project / "notebooks/03_model_development.ipynb"
    signals.mkdir()
    started, release = signals / "started", signals / "release"
    nb = nbformat.read(notebook, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if before in c.source)
    source = f"""#| stage
import pathlib, time
pathlib.Path({str(started)!r}).touch()
deadline = time.monotonic() + 600
while not pathlib.Path({str(release)!r}).exists():
    assert time.monotonic() < deadline, "no release signal within 600 s"
    time.sleep(0.1)"""
    nb.cells.insert(at, nbformat.v4.new_code_cell(source))
    nbformat.write(nb, notebook)
    run("git -c user.name=b -c user.email=b@b commit -qam 'wait in step 03'", project)
    return started, release


def wait_for(path, process, log, timeout=900):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"dvc repro ended with {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.2)


def start_repro(project, env, log, *args):
    out = open(log, "w")
    return subprocess.Popen(
        ["dvc", "repro", *args], cwd=project, env=project_env(env), stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def test_the_server_killed_during_model_development_then_two_clones_at_once(team_stack, teammate_a, teammate_b):
    """The MLflow server dies while step 03 runs: the stage fails naming the server and the registry is unchanged.
    After `team-stack up`, B's next `dvc repro` and A's forced step 03 (alone: the steps before it do not talk to the
    server), at the same time, both succeed; the registry's aliases point at versions both clones know, and both
    clones' runs are on the server."""
    from mlflow import MlflowClient

    name, base = SMOKE["model_deployment"]["registered_model"], team_stack.base
    before = champion_state(team_stack.uri, name)
    started, release = insert_waiting_cell(teammate_b, base / "signals")
    # B's step 03 changed (the waiting cell): B reruns from step 03, with the restored contacts
    env = {**teammate_a.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    process = start_repro(teammate_b, env, base / "b-killed.log")
    try:
        wait_for(started, process, base / "b-killed.log")
        os.killpg(int((Path(team_stack.env["TEAM_DIR"]) / "mlflow.pid").read_text()), signal.SIGKILL)
        release.touch()
        assert process.wait(timeout=600) != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    printed = (base / "b-killed.log").read_text()
    print("MLflow server killed during step 03, dvc repro printed:\n" + "\n".join(printed.strip().splitlines()[-6:]))
    assert "model_development" in printed and f"MLflow tracking server {team_stack.uri} is unreachable" in printed
    run(["team-stack", "up"], ROOT, env=team_stack.env, timeout=900)
    assert champion_state(team_stack.uri, name) == before  # nothing half-registered, @champion unchanged

    started = time.monotonic()
    both = {
        "b": start_repro(teammate_b, env, base / "b-again.log"),
        "a": start_repro(teammate_a.project, teammate_a.env, base / "a-again.log", "-f", "-s", "model_development"),
    }
    codes = {who: p.wait(timeout=2400) for who, p in both.items()}
    print(f"two clones at once: {time.monotonic() - started:.0f} s")
    assert codes == {"a": 0, "b": 0}, {who: (base / f"{who}-again.log").read_text()[-3000:] for who in codes}
    client = MlflowClient(team_stack.uri)
    pointers = {who: load_json(p / "models/champion.json") for who, p in (("a", teammate_a.project), ("b", teammate_b))}
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version in {str(p["version"]) for p in pointers.values()}
    aliases = {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    assert aliases.get("previous") != aliases["champion"] == str(champion.version)  # consistent aliases
    for project in (teammate_a.project, teammate_b):  # each clone's new candidate run is on the server
        assert client.get_run(load_json(project / "models/candidate.json")["run_id"]).info.status == "FINISHED"
    # B's experiment, as A sees it from A's clone: B's candidate run in it, and B's model loads on A's side
    b_candidate = load_json(teammate_b / "models/candidate.json")
    seen_by_a = run(
        [sys.executable, "-c", SEEN_FROM_A, b_candidate["run_id"], b_candidate["model_uri"]],
        teammate_a.project,
        env=teammate_a.env,
    )
    assert seen_by_a.stdout.split() == [SMOKE["shared"]["mlflow_experiment"], "loaded"], seen_by_a.stdout


SEEN_FROM_A = """
import os, sys
import mlflow
from lib.core import project_root, tracking_uri
mlflow.set_tracking_uri(tracking_uri(project_root(), os.environ))
print(mlflow.get_experiment(mlflow.get_run(sys.argv[1]).info.experiment_id).name)
mlflow.pyfunc.load_model(sys.argv[2])
print("loaded")
"""
