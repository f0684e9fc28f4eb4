"""Every stage declares what it uses: each params section its notebook reads, and each lib module it imports (directly
or
through another lib module), is in its dvc.yaml stage, so that `dvc repro` reruns exactly what a change affects."""

import ast
import copy
import functools

import nbformat
import yaml

from conftest import ROOT, cell_tree
from lib.core import CHARTER_FILE, SECTIONS, STAGES, step_notebook


@functools.cache  # each notebook and lib file is parsed once for all the tests here
def notebook_cells(notebook) -> list:
    """The parsed code cells of `notebook` (IPython magics and shell lines left out)."""
    return [cell_tree(c.source) for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]


def _constant(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def params_read(trees) -> set:
    """Params sections a notebook reads — `load_params(path, "<section>", ...)`, `open_stage("<section>", ...)` (which
    reads `shared` too) or `load_yaml(path)["<section>"]` — and the charter file when it reads `CHARTER_FILE`."""
    found = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params" and len(node.args) >= 2:
            found.add(_constant(node.args[1]))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open_stage" and node.args:
            found |= {_constant(node.args[0]), "shared"}
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "load_yaml"
        ):
            found.add(_constant(node.slice))
        if isinstance(node, ast.Name) and node.id == "CHARTER_FILE":
            found.add(CHARTER_FILE)
    return found - {None}


def lib_modules(trees, package="lib") -> set:
    """Modules of `lib` imported by `trees`: `from lib.x import ...`, `from lib import x`, `import lib.x`, and the
    relative
    `from .x import ...` of lib's own files."""
    found = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if module in (package, "."):
                found |= {a.name for a in node.names}
            elif module.startswith((f"{package}.", ".")):
                found.add(module.lstrip(".").removeprefix(f"{package}."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix(f"{package}.") for a in node.names if a.name.startswith(f"{package}.")}
    return {m for m in found if (ROOT / "lib" / f"{m}.py").exists()}


@functools.cache
def lib_tree(module) -> ast.Module:
    return ast.parse((ROOT / "lib" / f"{module}.py").read_text())


def with_lib_dependencies(modules) -> set:
    """`modules` and every lib module they import, transitively."""
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += lib_modules([lib_tree(module)])
    return seen


def declared(stage_spec) -> tuple:
    """(params sections and files declared whole, lib modules declared as deps) of one dvc.yaml stage."""
    sections = {
        p if isinstance(p, str) else next(iter(p))
        for p in stage_spec.get("params", [])
        if (isinstance(p, str) and "." not in p) or (isinstance(p, dict) and next(iter(p.values())) is None)
    }
    modules = {
        d.removeprefix("lib/").removesuffix(".py")
        for d in stage_spec.get("deps", [])
        if d.startswith("lib/") and d.endswith(".py")
    }
    return sections, modules


def undeclared(stages, root=ROOT) -> list:
    """What each stage's notebook uses and its dvc.yaml stage does not declare, as readable problems."""
    problems = []
    for stage in STAGES:
        trees = notebook_cells(step_notebook(stage, root))
        sections, modules = declared(stages[stage])
        used_modules = with_lib_dependencies(lib_modules(trees) | {"core"})  # run-stage itself is lib.core
        problems += [
            f"{stage}: reads params {s!r} but does not declare it whole in dvc.yaml"
            for s in sorted(params_read(trees) - sections)
        ]
        problems += [
            f"{stage}: imports lib/{m}.py but does not declare it as a dependency"
            for m in sorted(used_modules - modules)
        ]
    return problems


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_the_params_and_lib_modules_it_uses():
    assert undeclared(dvc_stages()) == []


def test_every_section_a_notebook_reads_is_a_real_one():
    for stage in STAGES:
        assert params_read(notebook_cells(step_notebook(stage, ROOT))) <= {*SECTIONS, CHARTER_FILE}, stage


def test_a_removed_declaration_is_caught():
    stages = copy.deepcopy(dvc_stages())
    stages["model_monitoring"]["params"].remove("model_monitoring")
    stages["model_monitoring"]["deps"].remove("lib/model_development.py")
    stages["business_understanding"]["params"] = ["shared"]
    assert undeclared(stages) == [
        "business_understanding: reads params 'charter.yaml' but does not declare it whole in dvc.yaml",
        "model_monitoring: reads params 'model_monitoring' but does not declare it whole in dvc.yaml",
        "model_monitoring: imports lib/model_development.py but does not declare it as a dependency",
    ]


def test_a_section_declared_only_in_part_is_caught():
    stages = copy.deepcopy(dvc_stages())
    stages["model_deployment"]["params"] = ["shared", "model_deployment.target_campaign"]
    assert undeclared(stages) == [
        "model_deployment: reads params 'model_deployment' but does not declare it whole in dvc.yaml"
    ]
