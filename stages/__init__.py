"""The DVC pipeline's stages, one module each, run as `python -m stages.<name>` by dvc.yaml; what runs
them (argument parsing, exit codes, the launcher, the watchdog, the warm stage runner) is
`stages.runtime`.

dvc.yaml declares the stages and their order once: `stage_order` reads it, and whoever sequences
the stages (the train-loop flow) follows it instead of keeping a list of its own. This package
imports nothing at import time: every stage process imports it first.
"""

from __future__ import annotations

from pathlib import Path


def _declared(dvc_file: str | Path) -> dict:
    """dvc.yaml's `stages` mapping, in file order."""
    from ruamel.yaml import YAML

    data = YAML(typ="safe", pure=True).load(Path(dvc_file).read_text())
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        raise ValueError(f"{dvc_file}: no `stages` mapping")
    return stages


def stage_order(dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """The stage names of `dvc_file` in file order; a `foreach` stage once, by its name (DVC names
    its instances `<name>@<item>`)."""
    return list(_declared(dvc_file))


def foreach_items(dvc_file: str | Path = "dvc.yaml") -> dict[str, str]:
    """{stage: what it iterates over} for the `foreach` stages of `dvc_file`, as written there,
    e.g. {"rollout": "${pipeline.loop}", "eval_checkpoint": "${pipeline.eval_at}"}."""
    return {name: str(stage["foreach"]) for name, stage in _declared(dvc_file).items()
            if isinstance(stage, dict) and "foreach" in stage}
