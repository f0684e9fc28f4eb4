"""`make bench-scale`'s own parts: the memory of a whole process tree, the skip rules for disk and memory, the engine
comparison that must catch a difference, and the goals read from the figures."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import (  # noqa: E402
    KEYS,
    RUNNER,
    cell_seconds,
    code_version,
    goals,
    in_fresh_process,
    markdown,
    run_measured,
    same_answers,
    skip_reason,
    tree_rss_mb,
)

HOLD = "import sys; b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); {end}"


def test_the_tree_memory_counts_the_children_of_a_shell():
    child = HOLD.format(mb=300, end="sys.stdin.read()")
    shell = subprocess.Popen(
        ["bash", "-c", f'{sys.executable} -c "{child}"; true'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert shell.stdout.readline().strip() == "ready"  # the child holds its 300 MB now
        assert tree_rss_mb(shell.pid) >= 300
    finally:
        shell.stdin.close()
        shell.wait(timeout=60)
    assert tree_rss_mb(shell.pid) == 0


def test_a_measured_command_reports_its_largest_process_and_a_failure_stops_with_its_log(tmp_path):
    figures = run_measured([sys.executable, "-c", HOLD.format(mb=200, end="")], tmp_path, tmp_path / "log")
    assert figures["peak_rss_mb"] >= 200 and figures["seconds"] > 0
    assert (tmp_path / "log").read_text().strip() == "ready"
    with pytest.raises(SystemExit, match=r"failed in (?s:.*)no such stage"):
        run_measured([sys.executable, "-c", "raise SystemExit('no such stage')"], tmp_path, tmp_path / "log")


GB = 10**9


def test_a_factor_is_skipped_for_disk_or_for_step_02s_memory_and_says_which():
    memory = 24 * 2**30
    assert skip_reason(10, ["pandas", "spark"], 0.04 * GB, 50 * GB, memory, {}) == ""  # nothing measured yet: it runs
    assert "needs about 52 GB of disk, 50 GB free" in skip_reason(100, ["pandas", "spark"], 0.04 * GB, 50 * GB, 0, {})
    assert skip_reason(10, ["spark"], 0.04 * GB, 500 * GB, memory, {1: 1553}) == ""  # about 15 GB
    # The figures measured here: ×1 1,553 MB and ×10 2,892 MB. The line through them says 15 GB for ×100; it took 21.5.
    too_much = skip_reason(100, ["spark"], 0.04 * GB, 500 * GB, memory, {1: 1553, 10: 2892})
    assert "2,892 MB on ×10, so ×100 would need up to about 28 GB" in too_much and "24 GB" in too_much
    assert skip_reason(20, ["spark"], 0.04 * GB, 500 * GB, memory, {1: 1553, 10: 2892}) == ""  # about 6 GB


def _answers():
    features = pd.DataFrame({"household_id": [1, 2], "campaign_id": [18, 18], "coupon_upc": [7, 8], "spend": [1.5, 2]})
    scores = features[KEYS].assign(score=[0.25, 0.5])
    return features, scores, scores[KEYS]


def test_the_engine_comparison_passes_equal_answers_and_catches_each_difference():
    features, scores, sends = _answers()
    same = same_answers((features, features.copy()), (scores, scores.copy()), (sends, sends.copy()))
    assert same["features_identical"] and same["scores_within_tolerance"] and same["send_lists_equal"]

    moved = features.assign(spend=[1.5, 2.0000001])
    assert not same_answers((features, moved), (scores, scores), (sends, sends))["features_identical"]
    off = same_answers((features, features), (scores, scores.assign(score=[0.25, 0.5 + 1e-6])), (sends, sends))
    assert not off["scores_within_tolerance"] and off["max_score_difference"] == pytest.approx(1e-6)
    missing = same_answers((features, features), (scores, scores.head(1)), (sends, sends))
    assert missing["unmatched_score_rows"] == 1 and not missing["scores_within_tolerance"]
    assert not same_answers((features, features), (scores, scores), (sends, sends.head(1)))["send_lists_equal"]


def _run(seconds, tree_mb):
    stages = {"data_acquisition": {"seconds": seconds, "peak_rss_mb": tree_mb, "tree_rss_mb": tree_mb}}
    rate = {"rows": 10, "seconds": 1.0, "rows_per_s": 10}
    return {"stages": stages, "throughput": {"features": rate, "scoring": rate}}


def test_the_goals_are_read_from_the_figures_and_the_table_shows_every_run():
    results = {
        "runs": {
            1: {"pandas": _run(100, 2000), "spark": _run(150, 2500)},
            10: {"pandas": _run(1200, 9000), "spark": _run(900, 4500) | {"code": "8a50688"}},
        },
        "same_answers": {},
        "skipped": {100: "needs about 52 GB of disk, 50 GB free"},
        "machine": {"cpus": 2, "memory_gb": 24, "python": "3.11", "spark_master": "local[*]"},
    }
    assert goals(results) == [
        "×10 on Spark, every stage within 4,096 MB (whole process tree): missed: data_acquisition",
        "pandas: ×10 data took 12.0× the time of ×1 over every stage (goal ≤ 10×): missed",
        "spark: ×10 data took 6.0× the time of ×1 over every stage (goal ≤ 10×): met",
        "×1: Spark took 1.50× the time of pandas (goal ≤ 2×): met",
    ]
    table = markdown(results)
    assert "| ×10 | spark | data_acquisition | 900.0 | 4,500 | 4,500 |" in table
    assert "- ×100: skipped, needs about 52 GB of disk, 50 GB free" in table
    assert "| ×10 | spark | 8a50688 | 10 | 10 | 10 | 10 |" in table


def test_a_run_that_stopped_early_is_compared_on_the_stages_it_ran():
    stopped = _run(300, 3000)
    stopped["stages"]["model_development"] = stopped["stages"]["data_acquisition"]
    stopped["throughput"] = {}
    full = _run(100, 2000)
    full["stages"] |= {
        "model_development": full["stages"]["data_acquisition"],
        "reports": {"seconds": 500, "peak_rss_mb": 300, "tree_rss_mb": 400},
    }
    results = {"runs": {"1": {"spark": full}, "10": {"spark": stopped}}, "same_answers": {}, "skipped": {}}
    assert goals(results)[1] == (
        "spark: ×10 data took 3.0× the time of ×1 over the stages up to model_development (goal ≤ 10×): met"
    )
    results["machine"] = {"cpus": 2, "memory_gb": 24, "python": "3.11", "spark_master": "local[*]"}
    assert "| ×10 | spark | — | — | — | — | — |" in markdown(results)  # no commit recorded, no throughput


def test_the_throughput_is_timed_on_the_run_cell_that_calls_the_function_not_the_one_that_defines_it(tmp_path):
    def cell(source, seconds):
        return {"cell_type": "code", "source": [source], "metadata": {RUNNER: {"duration": seconds}}}

    cells = [cell("def development_rows(tables):\n    ...", 0.01), cell("#| stage\nrows = development_rows(t)", 42.5)]
    (tmp_path / "03.ipynb").write_text(json.dumps({"cells": cells}))
    assert cell_seconds(tmp_path / "03.ipynb", "development_rows(") == 42.5
    with pytest.raises(ValueError, match="no run cell holds 'score_campaign\\('"):
        cell_seconds(tmp_path / "03.ipynb", "score_campaign(")


def test_each_run_records_the_commit_its_copy_was_made_from_and_whether_code_differed(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "benchmarks").mkdir()
    for name in ("step.py", "benchmarks/scale.md"):
        (tmp_path / name).write_text("before\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    commit = git("rev-parse", "--short", "HEAD").strip()
    assert code_version(tmp_path) == commit
    (tmp_path / "benchmarks/scale.md").write_text("results\n")  # the benchmark's own output: not a code change
    assert code_version(tmp_path) == commit
    (tmp_path / "step.py").write_text("after\n")
    assert code_version(tmp_path) == commit + "+changes"


def test_the_engine_comparison_runs_in_a_process_of_its_own():
    assert in_fresh_process(os.getpid) != os.getpid()
