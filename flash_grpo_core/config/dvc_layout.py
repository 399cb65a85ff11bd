"""The iterations spelled out for dvc.yaml, which cannot count: `pipeline.loop` and `pipeline.eval_at`.

DVC's `foreach` needs the list of items written in params.yaml, so the iteration count lives there
twice: as `iterations` and as the {iteration: previous} mapping the rollout/score/update stages
iterate over; the evaluated checkpoints likewise. `python -m flash_grpo_core.pipeline.iterations N`
(and the Prefect flow) rewrite them together; config.py checks that they agree.
"""

from __future__ import annotations


def dvc_loop(iterations: int) -> dict[str, int]:
    """The `pipeline.loop` mapping for `iterations` iterations: {"1": 0, "2": 1, ...}."""
    return {str(it): it - 1 for it in range(1, iterations + 1)}


def eval_points(iterations: int, every: int) -> tuple[int, ...]:
    """The evaluated checkpoints: 0 (the base), every `every`-th iteration, and the last."""
    between = range(every, iterations, every) if every else ()
    return (0, *between, iterations)


def dvc_layout(iterations: int, eval_every: int) -> dict:
    """The `pipeline` keys that spell out the iterations for dvc.yaml: `loop` and `eval_at`."""
    return {"loop": dvc_loop(iterations), "eval_at": list(eval_points(iterations, eval_every))}


def set_dvc_layout(data, iterations: int) -> None:
    """Set `iterations` and the pipeline keys spelling them out in a round-trip (ruamel) params mapping."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    data["iterations"] = iterations
    pipeline = data.setdefault("pipeline", CommentedMap())
    for key, value in dvc_layout(iterations, int(pipeline.get("eval_every") or 0)).items():
        node = CommentedMap(value) if isinstance(value, dict) else CommentedSeq(value)
        node.fa.set_flow_style()
        pipeline[key] = node
