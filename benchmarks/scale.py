"""`make bench-scale`: the pipeline on the real data ×1 and ×N with the pandas and the Spark engine.

Per factor and engine, in a disposable copy of the project reading `data/scaled/x<N>` (written by `scale-data` when
missing): each stage's wall time, the peak memory of its largest process and of its whole process tree (DVC, the
kernel, Spark's JVM and Python workers), feature and scoring rows per second; then whether the two engines gave the
same feature table, scores and send list. A factor is skipped, and the reason said, when the disk lacks room for it or
when step 02 might need more memory than the machine has (extrapolated in proportion from the largest factor measured:
an upper bound, as its peak grows more slowly than the data). Writes benchmarks/scale.json and benchmarks/scale.md.
"""

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.dataset as ds
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from benchmark import stages as pipeline_stages  # noqa: E402

from conftest import make_project_copy, project_env  # noqa: E402
from lib.model_development import KEYS  # noqa: E402  (household, campaign, coupon: a row of the feature table)

STAGE_BUDGET_MB = 4096  # the peak-memory budget of a stage (benchmarks/benchmark.py)
COPY_SIZE_FACTOR = 6  # a project copy holds the source about this many times over: raw, processed, features, DVC cache
RUNNER = "papermill"  # the cell metadata key under which the notebook runner records each cell's duration
TIMED_CELLS = {  # the run cell whose papermill duration is the feature build, and the scoring, of each engine
    "features": ("model_development", "development_rows("),
    "scoring": ("model_deployment", "score_campaign("),
}


# ---------------------------------------------------------------- measuring one command


def tree_rss_mb(pid) -> float:
    "Resident memory of process `pid` and all its descendants, in MB (0 once it is gone)."
    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_measured(cmd, cwd, log_path, interval_s=0.5) -> dict:
    """Run `cmd` in `cwd` (output to `log_path`): wall time, peak memory of its largest process (exact, from the
    operating system) and of its whole tree (sampled every `interval_s`). A failure stops the benchmark with the log's
    tail."""
    started, peak, done = time.perf_counter(), [0.0], threading.Event()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=project_env(), stdout=log, stderr=subprocess.STDOUT)

        def sample():
            while not done.wait(interval_s):
                peak[0] = max(peak[0], tree_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench-scale: {' '.join(cmd)} failed in {cwd}:\n{tail}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "tree_rss_mb": round(peak[0])}


def in_fresh_process(function, *args):
    """`function(*args)` in a process of its own. A command starts as a copy of this process, and its peak memory
    counts this process's peak at that moment: work that loads whole tables here (the engine comparison) would show
    in the largest-process figure of every stage measured after it."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def code_version(root=ROOT) -> str:
    """The commit a project copy made now is made from, `+changes` when tracked files outside `benchmarks/` (where the
    results are written) differ from it."""
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    changes = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks"],
        capture_output=True,
        text=True,
        check=True,
    )
    return commit.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


# ---------------------------------------------------------------- planning: data, disk and memory


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def scaled_data(factor, root=ROOT) -> Path:
    "`data/scaled/x<factor>`, written by `scale-data` when it is not there yet."
    out = Path(root) / f"data/scaled/x{factor}"
    if not (out / "_scale.json").exists():
        subprocess.run(
            ["scale-data", "--factor", str(factor), "--out", str(out)], cwd=root, env=project_env(), check=True
        )
    return out


def skip_reason(factor, engines, x1_bytes, free_bytes, memory_bytes, measured) -> str:
    """Why ×`factor` cannot run here ("" when it can): too little disk for its data and one project copy per engine,
    or a step-02 peak above 80 % of the machine's memory. The peak is extrapolated in proportion from the largest
    factor in `measured` ({factor: stage-02 peak MB}; with none, it runs): an upper bound while the peak grows no faster
    than the data. The line through the two largest factors is not one: through ×1 and ×10 it predicted 15 GB for
    ×100, which took 21.5 GB (README, "Scaling out")."""
    need = x1_bytes * factor * (1 + COPY_SIZE_FACTOR * len(engines))
    if need > free_bytes:
        return f"needs about {need / 1e9:,.0f} GB of disk, {free_bytes / 1e9:,.0f} GB free"
    if measured:
        largest = max(measured)
        expected_mb = measured[largest] * factor / largest
        if expected_mb * 2**20 > 0.8 * memory_bytes:
            return (
                f"step 02 peaked at {measured[largest]:,.0f} MB on ×{largest}, so "
                f"×{factor} would need up to about {expected_mb / 1024:,.0f} GB, more than 80 % of this machine's "
                f"{memory_bytes / 2**30:,.0f} GB"
            )
    return ""


def overlay_for(source_folder, engine, spark_master) -> dict:
    "The params overlay of one benchmark run: the files source on `source_folder`, and the engine."
    return {
        "shared": {"engine": engine},
        "spark": {"master": spark_master},
        "data_acquisition": {"source": {"kind": "files", "path": str(source_folder)}},
    }


# ---------------------------------------------------------------- one run: a factor on an engine


def cell_seconds(notebook, marker) -> float:
    """The papermill duration of the first run cell (`#| stage`) of executed `notebook` whose source holds `marker`:
    the cell that calls a function, not the one that defines it."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and source.startswith("#| stage") and marker in source:
            return float(cell["metadata"][RUNNER]["duration"])
    raise ValueError(f"{notebook}: no run cell holds {marker!r}")


def throughput(project, stages) -> dict:
    "Feature rows and scored rows per second of the engine's own cells (papermill durations), of the `stages` run."
    paths = {"features": "data/features/development.parquet", "scoring": "data/scored/scores.parquet"}
    out = {}
    for part, (stage, marker) in TIMED_CELLS.items():
        if stage not in stages:
            continue
        rows = ds.dataset(project / paths[part]).count_rows()  # a file, or a folder Spark wrote
        seconds = cell_seconds(project / f"reports/executed/{step_number(project, stage)}_{stage}.ipynb", marker)
        out[part] = {"rows": rows, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds)}
    return out


def step_number(project, stage) -> str:
    "The number of `stage`'s notebook (`03` for model_development)."
    return next(p.name[:2] for p in (project / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))


def stages_until(project, until="") -> list:
    "The stages of `project` in pipeline order, up to and including `until` (every stage when empty)."
    stages = pipeline_stages(project)  # benchmark.py's: the stages of dvc.yaml in order
    return stages[: stages.index(until) + 1] if until else stages


def bench_run(project, figures, stages, save, say=print):
    """`stages` of `project`, in order, each alone and forced, into `figures` (saved after each); then the throughput of
    the engine's cells."""
    figures.update(stages={}, throughput={})
    for stage in stages:
        figures["stages"][stage] = run_measured(
            ["dvc", "repro", "--single-item", "--force", stage], project, project.parent / "repro.log"
        )
        say(f"    {stage}: {figures['stages'][stage]}")
        save()
    figures["throughput"] = throughput(project, stages)


# ---------------------------------------------------------------- the same answers


def compare_engines(pandas_project, spark_project) -> dict:
    """Whether the Spark run gave the pandas run's feature table (identical after sorting), scores (within 1e-9) and
    send list; with the largest differences found."""
    features = [
        pd.read_parquet(p / "data/features/development.parquet").sort_values(KEYS, ignore_index=True)
        for p in (pandas_project, spark_project)
    ]
    scores = [pd.read_parquet(p / "data/scored/scores.parquet") for p in (pandas_project, spark_project)]
    sends = [
        pd.read_parquet(p / "data/scored/send_list.parquet")[KEYS].sort_values(KEYS, ignore_index=True)
        for p in (pandas_project, spark_project)
    ]
    return same_answers(features, scores, sends)


def same_answers(features, scores, sends, tolerance=1e-9) -> dict:
    "The comparison of `compare_engines` on loaded frames, each a (pandas, spark) pair."
    same_shape = features[0].shape == features[1].shape and list(features[0].columns) == list(features[1].columns)
    features_identical = same_shape and features[0].equals(features[1])
    joined = scores[0].merge(scores[1], on=KEYS, how="outer", suffixes=("_pandas", "_spark"), indicator=True)
    unmatched = int((joined._merge != "both").sum())
    score_gap = float((joined.score_pandas - joined.score_spark).abs().max()) if len(joined) else 0.0
    return {
        "feature_rows": [len(f) for f in features],
        "features_identical": bool(features_identical),
        "score_rows": [len(s) for s in scores],
        "unmatched_score_rows": unmatched,
        "max_score_difference": score_gap,
        "scores_within_tolerance": bool(unmatched == 0 and score_gap <= tolerance),
        "send_lists_equal": bool(sends[0].equals(sends[1])),
    }


# ---------------------------------------------------------------- the goals and the table


def time_ratio(stages, baseline) -> tuple:
    "Total seconds of `stages` over those of `baseline`, on the stages both ran; and which stages, in words."
    common = [s for s in stages if s in baseline]
    ratio = sum(stages[s]["seconds"] for s in common) / sum(baseline[s]["seconds"] for s in common)
    return ratio, "every stage" if len(common) == len(baseline) else f"the stages up to {common[-1]}"


def goals(results, budget_mb=STAGE_BUDGET_MB) -> list:
    """The three scale goals checked on `results` ({"runs": {factor: {engine: run}}}), one line each: every Spark stage
    of the largest factor within the budget (whole tree); time at most linear in the factor; Spark at most 2× pandas on
    ×1."""
    runs = {int(f): r for f, r in results["runs"].items()}
    if not runs:
        return []
    lines, largest = [], max(runs)
    if "spark" in runs[largest] and largest > 1:
        over = [s for s, m in runs[largest]["spark"]["stages"].items() if m["tree_rss_mb"] > budget_mb]
        verdict = "met" if not over else "missed: " + ", ".join(over)
        lines.append(f"×{largest} on Spark, every stage within {budget_mb:,} MB (whole process tree): {verdict}")
    if 1 in runs and largest > 1:
        for engine in sorted(set(runs[1]) & set(runs[largest])):
            ratio, stages = time_ratio(runs[largest][engine]["stages"], runs[1][engine]["stages"])
            verdict = "met" if ratio <= largest else "missed"
            lines.append(
                f"{engine}: ×{largest} data took {ratio:.1f}× the time of ×1 over {stages} "
                f"(goal ≤ {largest}×): {verdict}"
            )
    if 1 in runs and {"pandas", "spark"} <= set(runs[1]):
        total = {e: sum(m["seconds"] for m in runs[1][e]["stages"].values()) for e in ("pandas", "spark")}
        ratio = total["spark"] / total["pandas"]
        lines.append(f"×1: Spark took {ratio:.2f}× the time of pandas (goal ≤ 2×): {'met' if ratio <= 2 else 'missed'}")
    return lines


def markdown(results) -> str:
    "benchmarks/scale.md: a row per factor, engine and stage; the throughput; the comparisons, goals and skips."
    rows = [
        "| data | engine | stage | seconds | largest process MB | process tree MB |",
        "|---|---|---|---:|---:|---:|",
    ]
    rates = [
        "| data | engine | code | feature rows | rows/s | scored rows | rows/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for factor, engines in results["runs"].items():
        for engine, run in engines.items():
            for stage, m in run["stages"].items():
                rows.append(
                    f"| ×{factor} | {engine} | {stage} | {m['seconds']:,.1f} | {m['peak_rss_mb']:,} | "
                    f"{m['tree_rss_mb']:,} |"
                )
            cells = [
                f"{r['rows']:,} | {r['rows_per_s']:,}" if r else "— | —"
                for r in (run.get("throughput", {}).get(part) for part in TIMED_CELLS)
            ]
            rates.append(f"| ×{factor} | {engine} | {run.get('code', '—')} | {' | '.join(cells)} |")
    same = [
        f"- ×{factor}: features identical: {c['features_identical']} ({c['feature_rows'][0]:,} rows); scores within "
        f"1e-9: {c['scores_within_tolerance']} (largest difference {c['max_score_difference']:.2e}); send lists "
        f"equal: {c['send_lists_equal']}"
        for factor, c in results["same_answers"].items()
    ]
    skipped = [f"- ×{factor}: skipped, {reason}" for factor, reason in results["skipped"].items()]
    machine = results["machine"]
    return "\n".join(
        [
            "# `make bench-scale`",
            "",
            f"{machine['cpus']} cores, {machine['memory_gb']} GB, Python {machine['python']}, Spark master "
            f"`{machine['spark_master']}`. Each stage alone and forced (`dvc repro --single-item --force`).",
            "",
            *rows,
            "",
            "Throughput of the engine's own cells (step 03's feature build, step 04's batch scoring), and the commit"
            " each run's project copy was made from:",
            "",
            *rates,
            "",
            "The same answers (Spark against pandas):",
            "",
            *(same or ["- no factor ran on both engines"]),
            "",
            "Goals:",
            "",
            *[f"- {line}" for line in goals(results)],
            *(["", "Skipped:", "", *skipped] if skipped else []),
            "",
        ]
    )


# ---------------------------------------------------------------- main


def bench_scale(factors, engines, spark_master, workdir, save, until="", results=None, say=print) -> dict:
    """Every factor on every engine (smallest first), up to stage `until`, added to `results`; the engines compared
    per factor, and what was skipped and why. `save(results)` after each stage, so a long benchmark keeps what it
    measured."""
    results = results or {"runs": {}, "same_answers": {}, "skipped": {}}
    results["machine"] = machine(spark_master)
    stage02 = {
        int(f): r["stages"]["data_acquisition"]["tree_rss_mb"]
        for f, engines_run in results["runs"].items()
        for r in engines_run.values()
        if "data_acquisition" in r["stages"]
    }
    memory, x1_bytes = psutil.virtual_memory().total, folder_bytes(scaled_data(1))
    for factor in sorted(factors):
        reason = skip_reason(factor, engines, x1_bytes, shutil.disk_usage(workdir).free, memory, stage02)
        if reason:
            say(f"×{factor}: skipped, {reason}")
            results["skipped"][str(factor)] = reason
            continue
        source, projects = scaled_data(factor), {}
        for engine in engines:
            say(f"×{factor} on {engine}:")
            overlay = Path(workdir) / f"x{factor}-{engine}.yaml"
            overlay.write_text(yaml.safe_dump(overlay_for(source, engine, spark_master)))
            projects[engine] = make_project_copy(Path(workdir) / f"x{factor}-{engine}" / "project", overlay)
            figures = results["runs"].setdefault(str(factor), {}).setdefault(engine, {})
            figures["code"] = code_version()
            bench_run(projects[engine], figures, stages_until(projects[engine], until), lambda: save(results), say)
            stage02[factor] = figures["stages"]["data_acquisition"]["tree_rss_mb"]
        if {"pandas", "spark"} <= set(projects) and not until:
            results["same_answers"][str(factor)] = in_fresh_process(
                compare_engines, projects["pandas"], projects["spark"]
            )
            say(f"×{factor}: {results['same_answers'][str(factor)]}")
        for project in projects.values():
            shutil.rmtree(project.parent)  # the next factor needs the room
        save(results)
    return results


def machine(spark_master) -> dict:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "spark_master": spark_master,
    }


def saver(out):
    "Writes `<out>.json` and `<out>.md` of the results so far."

    def save(results):
        Path(f"{out}.json").write_text(json.dumps(results, indent=2) + "\n")
        Path(f"{out}.md").write_text(markdown(results))

    return save


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 10], help="data factors (default: 1 10)")
    parser.add_argument("--engines", nargs="+", default=["pandas", "spark"], choices=["pandas", "spark"])
    parser.add_argument("--spark-master", default="local[*]", help="the Spark master of the spark runs")
    parser.add_argument("--until", default="", help="the last stage to run (default: every stage)")
    parser.add_argument("--keep", action="store_true", help="add to the figures of other runs already in <out>.json")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/scale"), help="writes <out>.json and <out>.md")
    args = parser.parse_args()
    save, kept = saver(args.out), Path(f"{args.out}.json")
    results = json.loads(kept.read_text()) if args.keep and kept.exists() else None
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        results = bench_scale(args.factors, args.engines, args.spark_master, tmp, save, args.until, results)
    save(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
