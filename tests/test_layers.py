"""The house's rules (docs/architecture.md), checked on the source and on what imports load.

- Layers: the core's packages in one order, lowest first; a package imports only those below it,
  never `stages`, `flows` or `bench`; the flows and the stages import neither each other nor `bench`. Import statements inside
  functions count too (a load test does not run them).
- Loading: a part imported in a fresh interpreter loads nothing above it (an import that some other
  test made earlier cannot hide a wrong arrow); the engine, rewards and metrics load no task.
- Shape: only `__init__.py` and `__main__.py` at the package root, no import circle between
  modules, no core function over 8 parameters, no file over 400 lines, `bench/` a package.
"""

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "flash_grpo_core"
# The core's layers, lowest first: each may import the ones before it and nothing after it.
LAYERS = ("method", "config", "artifacts", "models", "rewards", "metrics", "engine", "tasks", "pipeline")
OUTSIDE = ("stages", "flows", "bench")  # above the whole core, which imports none of them
HEAVY = ("diffusers", "peft", "transformers")
MAX_PARAMETERS = 8


def imported_names(path: Path) -> list[str]:
    """Every module name an import statement in `path` names (`from a import b`: a and a.b)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] in OUTSIDE:
        return parts[0]
    return parts[1] if parts[0] == "flash_grpo_core" and len(parts) > 1 and parts[1] in LAYERS else None


def modules(folder: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.rglob("*.py")):
        name = ".".join((package, *path.relative_to(folder).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    wrong = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((CORE / layer).rglob("*.py"))
             for name in imported_names(path) if (found := layer_of(name)) and found not in allowed]
    assert not wrong, wrong


@pytest.mark.parametrize("folder, forbidden", [("flows", ("stages", "bench")), ("stages", ("flows", "bench"))])
def test_the_flows_and_the_stages_import_neither_each_other_nor_the_benchmarks(folder, forbidden):
    wrong = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / folder).rglob("*.py"))
             for name in imported_names(path) if name.split(".")[0] in forbidden]
    assert not wrong, wrong


def loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_lower_layers_load_nothing_above_them():
    """method, config, artifacts and models together: none loads a higher layer or model code beyond its own."""
    lower = LAYERS[:LAYERS.index("models") + 1]
    names = [name for layer in lower for name in modules(CORE / layer, f"flash_grpo_core.{layer}")]
    loaded = loaded_after("; ".join(f"import {name}" for name in names))
    assert "flash_grpo_core.models.wan" in loaded  # the check imported what it meant to
    above = sorted({layer_of(m) for m in loaded} - set(lower) - {None})
    assert not above, above


def test_the_math_loads_no_model_code():
    loaded = loaded_after("; ".join(f"import {name}" for name in modules(CORE / "method", "flash_grpo_core.method")))
    assert "torch" in loaded
    assert not [m for m in loaded if m.split(".")[0] in HEAVY or layer_of(m) not in (None, "method")]


def test_the_engine_rewards_and_metrics_load_no_task():
    names = [name for layer in ("rewards", "metrics", "engine")
             for name in modules(CORE / layer, f"flash_grpo_core.{layer}")]
    loaded = loaded_after("; ".join(f"import {name}" for name in names))
    assert "flash_grpo_core.engine.iteration" in loaded
    assert not [m for m in loaded if layer_of(m) in ("tasks", "pipeline", *OUTSIDE)]


def test_the_package_root_holds_only_its_api_and_main():
    assert sorted(path.name for path in CORE.glob("*.py")) == ["__init__.py", "__main__.py"]


def test_no_two_modules_import_each_other_round_a_circle():
    found = {**modules(CORE, "flash_grpo_core")}
    graph = {name: {target for target in imported_names(path) if target in found and target != name}
             for name, path in found.items()}
    circles, state = [], defaultdict(int)  # 0 unseen, 1 on the path, 2 done

    def visit(name, path):
        state[name] = 1
        for target in sorted(graph[name]):
            if state[target] == 1:
                circles.append(path[path.index(target):] + [target])
            elif state[target] == 0:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if state[name] == 0:
            visit(name, [name])
    assert not circles, circles


def test_no_core_function_takes_more_than_8_parameters():
    """Settings that travel together go as one frozen spec (SamplingSpec, a reward's options)."""
    long = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                count = len([n for n in names if n.arg not in ("self", "cls")])
                if count > MAX_PARAMETERS:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count})")
    assert not long, long


def test_bench_is_a_package_of_families():
    assert (ROOT / "bench" / "__init__.py").is_file()
    families = [path.parent.name for path in (ROOT / "bench").glob("*/__init__.py")]
    assert {"faults", "costs", "alignment"} <= set(families), families


def test_the_architecture_is_written_down():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert all(f"`{layer}`" in text for layer in LAYERS)  # every layer has its paragraph


def test_package_root_exposes_the_public_api_lazily():
    loaded = loaded_after("import flash_grpo_core")
    assert "torch" not in loaded  # flows and the config import the package without paying for torch
    import flash_grpo_core
    from flash_grpo_core.method import schedule, sde

    assert flash_grpo_core.flow_sigmas is schedule.flow_sigmas
    assert flash_grpo_core.sde_step is sde.sde_step
    assert flash_grpo_core.noise_scales is sde.noise_scales
    assert flash_grpo_core.rectification_coefficients is sde.rectification_coefficients
    with pytest.raises(AttributeError):
        flash_grpo_core.not_a_function  # noqa: B018


def test_no_module_is_longer_than_400_lines():
    """Files a reader takes in at once (docs/architecture.md): the layout keeps splitting them by role."""
    long = [f"{path.relative_to(ROOT)} ({lines} lines)" for folder in ("flash_grpo_core", "stages", "flows", "bench")
            for path in sorted((ROOT / folder).rglob("*.py")) if (lines := path.read_text().count("\n")) > 400]
    assert not long, long


def test_the_core_imports_neither_the_stages_nor_the_flows():
    """The stages and flows build on the core (its commands included: pipeline/prune.py,
    pipeline/iterations.py), never the other way; also the imports inside functions."""
    found = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(CORE.parent)}: {name}" for name in names
                      if name.split(".")[0] in ("stages", "flows")]
    assert not found, found


def test_every_project_path_the_code_and_docs_name_exists():
    """Docstrings, comments and docs that name a file of the project name one that is there."""
    import re

    named = re.compile(r"(?<![\w/.])((?:flash_grpo_core|stages|flows|bench)/[\w./-]*\w\.(?:py|md|yaml|sh))\b")
    texts = [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "params.yaml", ROOT / "dvc.yaml",
             *(path for folder in ("flash_grpo_core", "stages", "flows", "bench", "tests", "scripts")
               for path in (ROOT / folder).rglob("*.py"))]
    missing = sorted({f"{path.relative_to(ROOT)}: {name}" for path in texts
                      for name in named.findall(path.read_text()) if not (ROOT / name).exists()})
    assert not missing, missing
