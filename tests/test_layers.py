"""The package's layers (flash_grpo_core/__init__.py): lower layers never import higher ones.

Each check imports one part in a fresh interpreter and looks at what it loaded, so an import that
some other test made earlier cannot hide a wrong arrow.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "flash_grpo_core"
# Each layer, and the parts of the package it must not import (directly or through anything it imports).
FORBIDDEN = {
    "method": ("models", "engine", "artifacts", "rewards", "metrics", "report", "toy", "run"),
    "models": ("engine", "rewards", "metrics", "report", "toy", "run"),
    "artifacts": ("engine", "models", "rewards", "metrics", "report", "toy", "run"),
}
HEAVY = ("diffusers", "peft", "transformers")


def loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def submodules(layer: str) -> list[str]:
    return [f"flash_grpo_core.{layer}.{path.stem}" for path in sorted((CORE / layer).glob("*.py"))
            if path.stem != "__init__"]


def test_method_loads_no_model_code():
    modules = loaded_after("; ".join(f"import {name}" for name in submodules("method")))
    assert "torch" in modules  # the check imported what it meant to
    assert not [m for m in modules if m.split(".")[0] in HEAVY]
    assert not [m for m in modules if m.startswith("flash_grpo_core.") and m.split(".")[1] in FORBIDDEN["method"]]


@pytest.mark.parametrize("layer", ["models", "artifacts"])
def test_layer_imports_nothing_above_it(layer):
    modules = loaded_after("; ".join(f"import {name}" for name in submodules(layer)))
    assert f"{submodules(layer)[0]}" in modules
    above = [m for m in modules if m.startswith("flash_grpo_core.") and m.split(".")[1] in FORBIDDEN[layer]]
    assert not above, f"{layer} loads {above}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_statement_points_up(layer):
    """Also the imports inside functions, which a load test does not run."""
    for path in (CORE / layer).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                assert not (parts[0] == "flash_grpo_core" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]), \
                    f"{path.name} imports {name}"


def test_package_root_exposes_the_public_api_lazily():
    modules = loaded_after("import flash_grpo_core")
    assert "torch" not in modules  # flows and the config import the package without paying for torch
    import flash_grpo_core
    from flash_grpo_core.method import schedule, sde

    assert flash_grpo_core.flow_sigmas is schedule.flow_sigmas
    assert flash_grpo_core.sde_step is sde.sde_step
    assert flash_grpo_core.noise_scales is sde.noise_scales
    assert flash_grpo_core.rectification_coefficients is sde.rectification_coefficients
    with pytest.raises(AttributeError):
        flash_grpo_core.not_a_function  # noqa: B018


def test_no_module_is_longer_than_400_lines():
    """Files a reader takes in at once (STYLE.md): the layout keeps splitting them by role."""
    root = CORE.parent
    long = [f"{path.relative_to(root)} ({lines} lines)" for folder in ("flash_grpo_core", "stages", "flows", "bench")
            for path in sorted((root / folder).rglob("*.py")) if (lines := path.read_text().count("\n")) > 400]
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
