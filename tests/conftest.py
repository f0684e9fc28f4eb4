"""Shared fixtures: the project root, and disposable copies of the project for end-to-end runs; and the check that every
test needing a pipeline run carries the `pipeline` mark (the fast tier runs the others)."""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from lib.core import PIPELINE_FILES, load_yaml, merge_params, pipeline_stages

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a copy of the project leaves out: environments, stores, DVC caches and every stage output.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "mlflow.db",
    "mlartifacts",
    ".team",
    "cache",
    "scaled",  # data/scaled: the data ×N of `make scale-data`, never part of a copy
    "tmp",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "artifacts",
    "results.json",
)
OUTPUT_DIRS = ("data", "models", "metrics", "plots", "reports")
SPARK_LOCAL = {"master": "local[2]", "config": {"spark.sql.shuffle.partitions": 4}}  # Spark in the tests


def cell_tree(source):
    "A notebook cell's code as an `ast.Module`, its IPython magics (`%`) and shell lines (`!`) left out."
    import ast

    return ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))


def project_env(extra=None) -> dict:
    """The environment of this process with the project's virtual environment first on PATH, and without the MLflow
    tracking
    URI a test may have exported (MLflow's `set_tracking_uri` does): a project copy uses its own store unless `extra`
    names one."""
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def run(cmd, cwd, check=True, env=None, timeout=1800):
    """Run `cmd` with the project's environment first on PATH; returns the CompletedProcess."""
    full_env = project_env(env)
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str)
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def make_project_copy(dest: Path, overlay: Path = ROOT / "tests/smoke/params.yaml") -> Path:
    """A fresh git + DVC working copy of the project at `dest`, without outputs, running on params.yaml with `overlay`
    merged
    over it (the smoke slice by default; None: params.yaml as it is)."""
    shutil.copytree(ROOT, dest, ignore=NOT_COPIED)
    for folder in OUTPUT_DIRS:
        for path in (dest / folder).glob("*") if (dest / folder).exists() else []:
            if path.name != ".gitignore" and path.relative_to(dest).as_posix() not in PIPELINE_FILES:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for pipeline_file in PIPELINE_FILES:
        (dest / pipeline_file).with_suffix(".lock").unlink(missing_ok=True)
    if overlay is not None:
        merged = merge_params(load_yaml(ROOT / "params.yaml"), load_yaml(overlay), where=Path(overlay).name)
        (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm copy", dest)
    return dest


@pytest.fixture
def project_copy(tmp_path):
    return make_project_copy(tmp_path / "project")


def measure(cmd, cwd) -> dict:
    """Run `cmd` like `run`; returns its wall time and peak resident memory (the largest process in its tree)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def measure_stages(project, force=False) -> dict:
    """Each stage of `project`'s pipeline run in order, alone (`dvc repro --single-item`): its time and peak memory."""
    return {
        s: measure(["dvc", "repro", "--single-item", *(["--force"] if force else []), s], project)
        for s in pipeline_stages(project)
    }


@contextlib.contextmanager
def exclusive(lock_file: Path):
    """Hold an exclusive lock on `lock_file` (created if missing) for the duration of the block."""
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def wait_until(what, sign, timeout=300, processes=(), context=lambda: ""):
    """The first true value of `sign()`, checked every 0.2 s; fails when one of `processes` ends first or `timeout`
    seconds pass, with `context()` (a log's tail, say) in the message."""
    deadline = time.monotonic() + timeout
    while not (found := sign()):
        ended = [p for p in processes if p.poll() is not None]
        if ended:
            command = " ".join(map(str, ended[0].args))[:300]
            raise AssertionError(f"{command} exited with {ended[0].returncode} while waiting for {what}\n{context()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s\n{context()}")
        time.sleep(0.2)  # the poll interval
    return found


def build_once(folder: Path, build) -> None:
    """`build(folder)` unless an earlier call completed it, also when several processes ask at once: the first builds,
    the others wait for it. `folder/.built` marks a completed build; a failed one starts again from an empty folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(folder.parent / f"{folder.name}.lock"):
        if (folder / ".built").exists():
            return
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        build(folder)
        (folder / ".built").touch()


def _smoke_run(folder: Path) -> None:
    project = make_project_copy(folder / "project")
    (folder / "smoke_figures.json").write_text(json.dumps({"stages": measure_stages(project)}, indent=2))


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory, worker_id):
    """One smoke run of the whole pipeline, stage by stage, shared by the tests that only read its outputs, on every
    pytest-xdist worker (`build_once`). Each stage's time and peak memory are in `smoke_figures.json` beside the
    project."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # the workers' common temporary folder
    build_once(shared / "smoke", _smoke_run)
    return shared / "smoke" / "project"


@pytest.fixture(scope="module")
def deployed_smoke(smoke_pipeline, tmp_path_factory):
    """The session's smoke run, copied for one test module with its MLflow store (the models' artifacts stay where the
    run put them): processed data, a candidate and a registered @champion. A module may change its copy (switch it to
    the Spark engine, rerun a stage); the shared run stays as it was."""
    project = tmp_path_factory.mktemp("deployed") / "project"
    shutil.copytree(smoke_pipeline, project, symlinks=True)
    return project


def use_spark(project: Path) -> None:
    "Switch `project`'s params to the Spark engine in local mode (`SPARK_LOCAL`)."
    params = load_yaml(project / "params.yaml")
    params["shared"]["engine"], params["spark"] = "spark", SPARK_LOCAL
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def assert_close(got, want, where=""):
    "Equal nested results (dicts, lists, values), floats within 1e-9; `where` names the first difference."
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, abs=1e-9, nan_ok=True), where
    else:
        assert got == want, where


# ---------------------------------------------------------------- the fast tier and the pipeline tier

# A test needs a pipeline run when it uses one of these fixtures, directly or through a fixture built on them ...
PIPELINE_FIXTURES = frozenset({"project_copy", "smoke_pipeline"})
# ... or when it, or a fixture it uses, calls one of these (a project copy, an MLflow model server, a notebook kernel
# run)
PIPELINE_CALLS = frozenset({"make_project_copy", "serving", "NotebookClient"})
# ... or runs one of these commands (`dvc repro`, papermill, `make lab`).
PIPELINE_WORDS = frozenset({"repro", "papermill", "lab"})
TIERS = pytest.StashKey[dict]()


def _code_objects(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _strings(const):
    if isinstance(const, str):
        yield const
    elif isinstance(const, (tuple, frozenset)):  # ["make", "-s", "lab"] is compiled to one tuple constant
        for item in const:
            yield from _strings(item)


def _calls_and_words(function) -> set:
    """Names a function (and any function or lambda nested in it) refers to, and the string constants it holds."""
    code = getattr(getattr(function, "__wrapped__", function), "__code__", None)
    if code is None:
        return set()
    return {v for c in _code_objects(code) for v in (*c.co_names, *(s for k in c.co_consts for s in _strings(k)))}


def pipeline_needs(item) -> list:
    """Why the collected test `item` needs a pipeline run (empty when it does not)."""
    reasons = [f"uses fixture {name}" for name in sorted(PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())))]
    fixturedefs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    functions = {
        "the test": getattr(item, "function", None),
        **{
            f"fixture {name}": defs[-1].func
            for name, defs in fixturedefs.items()
            if defs and name not in PIPELINE_FIXTURES
        },
    }
    for where, function in functions.items():
        found = _calls_and_words(function)
        reasons += [f"{where} calls {name}" for name in sorted(PIPELINE_CALLS & found)]
        reasons += [f"{where} runs {word!r}" for word in sorted(PIPELINE_WORDS & found)]
    return reasons


# The pipeline tier's longest test files (`--durations`, alone: 370, 300, 130, 75, 90, 270, 200 and 150 s), in the
# order the tier hands them to its workers (`--no-loadscope-reorder`): the long ones start at once, on a worker each,
# and the short ones fill in around them. test_foundation_pipeline.py, third, needs no smoke run: it keeps a worker busy
# while the first test that needs the shared smoke run builds it.
LONGEST_FIRST = (
    "test_team.py",
    "test_spark_engine.py",
    "test_foundation_pipeline.py",
    "test_spark_pipeline.py",
    "test_spark_deployment.py",
    "test_model_monitoring.py",
    "test_model_deployment.py",
    "test_notebook_parity.py",
)


def start_rank(item) -> int:
    "Where `item`'s file stands in LONGEST_FIRST; every other file after them, in the order collected."
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Before `-m`, `-k` or `--deselect` leave anything out: record every collected test that needs a pipeline run, and
    whether it is marked `pipeline` (tests/test_tiers.py checks them). PIPELINE_TIER_REPORT=<file> writes the record as
    JSON."""
    record = {
        "modules": sorted({str(item.path) for item in items}),
        "needs": {item.nodeid: pipeline_needs(item) for item in items},
        "marked": sorted(item.nodeid for item in items if item.get_closest_marker("pipeline")),
    }
    record["needs"] = {nodeid: reasons for nodeid, reasons in record["needs"].items() if reasons}
    config.stash[TIERS] = record
    items.sort(key=start_rank)  # stable: a file's tests keep their order
    if os.environ.get("PIPELINE_TIER_REPORT"):
        Path(os.environ["PIPELINE_TIER_REPORT"]).write_text(json.dumps(record))
