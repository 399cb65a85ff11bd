"""The pipeline's stages and their order, declared once: dvc.yaml. Whoever sequences the stages (the
train-loop flow) or covers each of them (the fault harness's kill points) reads it from there
instead of keeping a list of its own.
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
