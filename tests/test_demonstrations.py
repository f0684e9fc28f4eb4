"""Every public function a notebook exports is demonstrated below it: a cell nbdev-test runs (neither `#| export` nor
`#| stage`) calls it on a tiny input. A function whose demonstration would start what the notebooks' unit tests must
not (Spark, a server, PostgreSQL, a kernel, a DVC run) is named instead by the test that exercises it."""

import ast
import re

import nbformat
import pytest

from conftest import ROOT, cell_tree

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# function → (the test file that exercises it, the name that test reaches it by: the function itself, the console
# script wrapping it, or the function or stage that calls it)
TESTED_ELSEWHERE = {
    # a JVM, a kernel's signals, DVC and git
    "vm_options": ("test_spark_engine.py", "vm_options"),
    "connect_mlflow": ("test_core.py", "connect_mlflow"),  # its store is made further down the notebook
    "stop_stage_on_signals": ("test_foundation_pipeline.py", "run-stage"),
    "guard_stage_kernel": ("test_foundation_pipeline.py", "run-stage"),
    "recover": ("test_recover.py", "recover"),
    "recover_cli": ("test_recover.py", "recover-pipeline"),
    # PostgreSQL and the MLflow server
    "pg_ready": ("test_team.py", "pg_ready"),
    "start_postgres": ("test_team.py", "start_postgres"),
    "start_mlflow": ("test_team.py", "team-stack"),
    "restore_restricted_cli": ("test_team.py", "restore-restricted"),
    # ydata-profiling's reports take seconds each
    "profile_table": ("test_data_acquisition.py", "data_acquisition"),
    "profile_tables": ("test_data_acquisition.py", "data_acquisition"),
    # Spark
    "read_spark_tables": ("test_spark_engine.py", "spark_tables"),
    "spark_tables": ("test_spark_engine.py", "spark_tables"),
    "write_parquet_atomically": ("test_spark_engine.py", "write_parquet_atomically"),
    "spark_promotion_shares": ("test_spark_engine.py", "spark_features"),
    "spark_feature_frame": ("test_spark_engine.py", "spark_features"),
    "spark_features": ("test_spark_engine.py", "spark_features"),
    "labelled_rows_on_spark": ("test_spark_engine.py", "labelled_rows_on_spark"),
    "spark_development_rows": ("test_spark_pipeline.py", "model_development"),
    "campaign_on_spark": ("test_spark_deployment.py", "model_deployment"),
    "spark_scores": ("test_spark_engine.py", "spark_scores"),
    "score_on_spark": ("test_spark_deployment.py", "model_deployment"),
    # an MLflow store with logged runs or a registry, or a model server
    "log_candidate": ("test_model_development.py", "model_development"),
    "log_development": ("test_model_development.py", "model_development"),
    "start_server": ("test_model_deployment.py", "serving"),
    "reconcile_cli": ("test_model_deployment.py", "reconcile-registry"),
    "register_challenger": ("test_model_monitoring.py", "close_the_loop"),
    "register_verdict": ("test_model_monitoring.py", "close_the_loop"),
}


def _flag(source) -> str:
    "The cell's nbdev flag (`export`, `stage`, …) or '' for a cell nbdev-test runs as it is."
    match = re.match(r"#\|\s*(\w+)", source)
    return match.group(1) if match else ""


def exported_functions(cells) -> list:
    "(name, cell index) of each public function defined at the top of an `#| export` cell."
    return [
        (node.name, i)
        for i, cell in enumerate(cells)
        if cell.cell_type == "code" and _flag(cell.source) == "export"
        for node in cell_tree(cell.source).body
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
    ]


def _names_used(source) -> set:
    """The names a cell's code refers to, as a variable or an attribute, or in code it hands another process as a
    string (`import name`, `name(`); a comment, or a mere mention in a string, does not count."""
    nodes = list(ast.walk(cell_tree(source)))
    texts = [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    calls = r"\bimport (?:\w+, )*(\w+)|(\w+)\("
    in_code = {name for text in texts for pair in re.findall(calls, text) for name in pair if name}
    return (
        {n.id for n in nodes if isinstance(n, ast.Name)}
        | {n.attr for n in nodes if isinstance(n, ast.Attribute)}
        | in_code
    )


def undemonstrated(cells) -> list:
    "The exported functions that no later cell nbdev-test runs refers to."
    demos = [(i, _names_used(c.source)) for i, c in enumerate(cells) if c.cell_type == "code" and not _flag(c.source)]
    return [name for name, at in exported_functions(cells) if not any(i > at and name in used for i, used in demos)]


def _cells(notebook) -> list:
    return nbformat.read(notebook, as_version=4).cells


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exported_function_is_demonstrated_below_it(notebook):
    missing = [name for name in undemonstrated(_cells(notebook)) if name not in TESTED_ELSEWHERE]
    assert not missing, f"exported without a demonstration below (nor a test named in TESTED_ELSEWHERE): {missing}"


def test_a_function_left_to_a_test_is_exported_undemonstrated_and_named_by_that_test():
    left = {name for notebook in NOTEBOOKS for name in undemonstrated(_cells(notebook))}
    stale = sorted(set(TESTED_ELSEWHERE) - left)  # demonstrated by now, or no longer exported
    assert not stale, f"TESTED_ELSEWHERE names functions a notebook demonstrates or no longer exports: {stale}"
    unnamed = [
        f"{function}: {test} never says {word!r}"
        for function, (test, word) in TESTED_ELSEWHERE.items()
        if not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", (ROOT / "tests" / test).read_text())
    ]
    assert not unnamed, f"TESTED_ELSEWHERE names a test that never says how it reaches the function: {unnamed}"


def test_a_function_without_a_demonstration_is_caught():
    cells = [
        nbformat.v4.new_code_cell("#| export\ndef shown(x):\n    return x\n\n\ndef hidden(x):\n    return x"),
        nbformat.v4.new_code_cell("#| export\ndef _private(x):\n    return x\n\n\nclass Error(ValueError): ..."),
        nbformat.v4.new_code_cell("test_eq(shown(1), 1)  # hidden(1) in a comment is no demonstration"),
        nbformat.v4.new_code_cell("#| stage\nrows = hidden(rows)"),  # nor is a run cell, which nbdev-test skips
    ]
    assert undemonstrated(cells) == ["hidden"]
    cells.insert(0, nbformat.v4.new_code_cell("assert lib.hidden(2) == 2"))  # above the definition: too early
    assert undemonstrated(cells) == ["hidden"]
    cells.append(nbformat.v4.new_code_cell("%time _ = [hidden(v) for v in range(3)]\nassert _ == [0, 1, 2]"))
    assert undemonstrated(cells) == ["hidden"]  # a magic's line is not parsed
    cells.append(nbformat.v4.new_code_cell("test_eq(shown('hidden'), 'hidden')"))
    assert undemonstrated(cells) == ["hidden"]  # nor is a string that only names it
    cells.append(nbformat.v4.new_code_cell("test_fail(lambda: hidden(None) + 1)"))
    assert undemonstrated(cells) == []
    cells[-1] = nbformat.v4.new_code_cell("run([sys.executable, '-c', 'from lib.x import hidden; hidden(1)'])")
    assert undemonstrated(cells) == []  # code run by another process
