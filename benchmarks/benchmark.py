"""Time and peak memory of every pipeline stage, the whole `dvc repro` and the no-op `dvc repro`; scoring memory and
REST latency.

Runs in a disposable copy of the project (so the working copy and its MLflow store are untouched) and
writes the figures to benchmarks/results.json. `--overlay tests/smoke/params.yaml` benchmarks the smoke slice.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from scoring import measure_scoring  # noqa: E402

from conftest import make_project_copy, project_env  # noqa: E402


def measure(cmd, cwd) -> dict:
    """Wall time and peak resident memory (largest process in the command's tree) of `cmd`."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def stages(project) -> list:
    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


def benchmark(project) -> dict:
    results = {"stages": {}}
    for stage in stages(project):  # in pipeline order, each after its upstream stages are done
        print(f"stage {stage} ...", flush=True)
        results["stages"][stage] = measure(["dvc", "repro", "--single-item", "--force", stage], project)
        print(f"  {results['stages'][stage]}", flush=True)
    print("whole pipeline (dvc repro --force) ...", flush=True)
    results["full_repro"] = measure(["dvc", "repro", "--force"], project)
    print("no-op dvc repro ...", flush=True)
    results["noop_repro"] = measure(["dvc", "repro"], project)
    print("scoring: peak memory at two chunk sizes, REST latency ...", flush=True)
    results["scoring"] = measure_scoring(project)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--overlay", default=None, help="params overlay merged over params.yaml (default: params.yaml as it is)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project_copy(Path(tmp) / "project", args.overlay and Path(args.overlay))
        results = benchmark(project)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "overlay": args.overlay and Path(args.overlay).name,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
