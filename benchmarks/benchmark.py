"""Time and peak memory of every pipeline stage, the whole `dvc repro` and the no-op `dvc repro`; scoring memory and
REST latency.

Runs in a disposable copy of the project (so the working copy and its MLflow store are untouched) and
writes the figures to benchmarks/results.json. `--overlay tests/smoke/params.yaml` benchmarks the smoke slice.
Fails (exit status 1) when a stage, or a whole `dvc repro`, needs more than the peak-memory budget (4 GB).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from scoring import measure_scoring  # noqa: E402

from conftest import make_project_copy  # noqa: E402
from conftest import measure as measure_command  # noqa: E402
from lib.core import pipeline_stages  # noqa: E402

PEAK_MEMORY_BUDGET_MB = 4096  # no stage may need more: the template runs on a laptop or a small CI runner


def measure(cmd, cwd) -> dict:
    """Wall time and peak resident memory (largest process in the command's tree) of `cmd`; stops on a failure."""
    try:
        return measure_command(cmd, cwd)
    except AssertionError as err:
        raise SystemExit(str(err)) from None


def over_budget(results, budget_mb=PEAK_MEMORY_BUDGET_MB) -> list:
    """What in `results` (figures of stages and whole repros) went over the peak-memory budget, one line each."""
    runs = {f"stage {s}": f for s, f in results.get("stages", {}).items()}
    runs.update({name.replace("_", " "): results[name] for name in ("full_repro", "noop_repro") if name in results})
    return [
        f"{name}: peak memory {figures['peak_rss_mb']:,.0f} MB is over the {budget_mb:,} MB budget"
        for name, figures in runs.items()
        if figures["peak_rss_mb"] > budget_mb
    ]


def check_budget(results, budget_mb=PEAK_MEMORY_BUDGET_MB):
    """Stop with a non-zero exit naming every stage over the peak-memory budget."""
    problems = over_budget(results, budget_mb)
    if problems:
        raise SystemExit("benchmark: over budget\n  " + "\n  ".join(problems))


def stages(project) -> list:
    "The DVC addresses of `project`'s stages, in an order that runs each after its upstream stages."
    return list(pipeline_stages(project))


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
    parser.add_argument("--budget-mb", type=int, default=PEAK_MEMORY_BUDGET_MB, help="peak-memory budget of a stage")
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
    check_budget(results, args.budget_mb)
    print(f"benchmark: every stage within the {args.budget_mb:,} MB peak-memory budget")


if __name__ == "__main__":
    main()
