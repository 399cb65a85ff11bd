"""`evaluate` stage: the last checkpoint against the base, metrics over iterations, the HTML report.

    python -m stages.evaluate --points runs/tiny/eval/points --checkpoint runs/tiny/it2/checkpoint \
        --report runs/tiny/eval/report --metrics runs/tiny/eval/metrics.json \
        --history runs/tiny/eval/history.json --curves runs/tiny/eval/curves

Reads what the `eval_checkpoint@k` stages wrote for every evaluated checkpoint k of
`pipeline.eval_at` (the base 0, every `pipeline.eval_every`-th iteration and the last): no model
runs here. Writes metrics.json (the DVC metric: the held-out reward's base, trained = the last
checkpoint, delta, and the delta's 95% interval over the paired videos; numbers only, so that
`dvc metrics show` stays narrow), one curve per metric over the evaluated iterations
(curves/<metric>.json, for `dvc plots`), the training history of the last checkpoint
(history.json), and the report directory: report.html (the metrics table, the margin, the curves,
base | trained videos of the first `eval.report_samples` prompts) and evaluation.json (every
metric's base / trained / delta, the margin, what was evaluated and what is not configured).
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.runtime import common


def main(argv=None) -> int:
    parser = common.parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--points", required=True, help="directory of the eval_checkpoint stages' it<k>/ outputs")
    parser.add_argument("--checkpoint", required=True, help="the last checkpoint (for its training history)")
    parser.add_argument("--report", required=True, help="directory for report.html and its videos")
    parser.add_argument("--metrics", required=True, help="metrics.json to write")
    parser.add_argument("--history", required=True, help="history.json (training curves) to write")
    parser.add_argument("--curves", required=True, help="directory for one <metric>.json curve per metric")
    args = parser.parse_args(argv)
    return common.run("evaluate", work, args)


def read_point(points: Path, iteration: int) -> dict:
    """An eval_checkpoint stage's metrics.json; FileNotFoundError naming the stage to run if missing."""
    path = points / f"it{iteration}" / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro eval_checkpoint@{iteration}` first")
    from flash_grpo_core.artifacts.atomic import read_json_object
    from flash_grpo_core.artifacts.checkpoint import CheckpointError

    point = read_json_object(path, CheckpointError, f"rerun `dvc repro -f -s eval_checkpoint@{iteration}`")
    if point.get("iteration") != iteration:
        raise CheckpointError(f"{path} evaluated iteration {point.get('iteration')}, not {iteration}")
    return point


def read_videos(points: Path, iteration: int) -> tuple[list[str], list[str], list]:
    """(prompt ids, prompts, uint8 videos [F, H, W, 3]) stored for the report at one point."""
    from flash_grpo_core.artifacts.safetensors_io import read_safetensors
    from flash_grpo_core.artifacts.checkpoint import CheckpointError

    path = points / f"it{iteration}" / "videos.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro eval_checkpoint@{iteration}` first")
    try:
        tensors, metadata = read_safetensors(path)
        return metadata["prompt_ids"], metadata["prompts"], list(tensors["videos"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: unreadable ({error}); rerun `dvc repro eval_checkpoint@{iteration}`") from error


def as_entries(point: dict) -> dict:
    """{name: mean | not-configured entry} of a point, as the report's metrics table takes them."""
    from flash_grpo_core.metrics import not_configured

    return {**point["metrics"], **{name: not_configured(reason) for name, reason in point["not_configured"].items()}}


def curve_file(name: str) -> str:
    """A metric's curve file name: reward/color -> reward-color.json."""
    return name.replace("/", "-") + ".json"


def curves_from(points: list[dict]) -> dict[str, list[dict]]:
    """{metric: [{"iteration": k, "value": mean}, ...]} over the points, in iteration order."""
    curves: dict[str, list[dict]] = {}
    for point in points:
        for name, value in point["metrics"].items():
            curves.setdefault(name, []).append({"iteration": point["iteration"], "value": value})
    return curves


def write_curves(curves: dict[str, list[dict]], directory: str) -> None:
    from flash_grpo_core.artifacts.atomic import atomic_directory

    with atomic_directory(directory) as staging:
        for name, rows in curves.items():
            (staging / curve_file(name)).write_text(json.dumps(rows, indent=1) + "\n")


def reward_margin(base: dict, trained: dict) -> dict | None:
    """The paired trained - base difference of the reward with its interval (metrics/paired.py),
    or None for points without per-video rewards."""
    from flash_grpo_core.metrics.paired import paired_delta

    if "reward" not in base.get("per_video", {}) or "reward" not in trained.get("per_video", {}):
        return None
    return paired_delta(base["per_video"]["reward"], trained["per_video"]["reward"], trained["prompts"])


def metric_record(base: dict, trained: dict, margin: dict | None) -> dict:
    """metrics.json: the held-out reward only, flat and numeric (one narrow row in `dvc metrics show`)."""
    record = {"iteration": trained["iteration"], "base": base["metrics"]["reward"],
              "trained": trained["metrics"]["reward"],
              "delta": trained["metrics"]["reward"] - base["metrics"]["reward"]}
    if margin is not None:
        record.update(ci_low=margin["delta_low"], ci_high=margin["delta_high"])  # short: one 120-column table
    return record


def work(args) -> dict:
    """The last checkpoint against the base from the evaluated points: report, metrics, curves, history."""
    from flash_grpo_core.artifacts.atomic import write_json
    from flash_grpo_core.artifacts.checkpoint import CheckpointError, read_state
    from flash_grpo_core.config.dvc_layout import eval_points
    from flash_grpo_core.pipeline.report import ReportInputs, write_report

    params = common.load_params(args.params)
    iterations = params.pipeline.eval_at or eval_points(params.iterations, params.pipeline.eval_every)
    state = read_state(args.checkpoint)
    if state["iteration"] != iterations[-1]:
        raise CheckpointError(f"{args.checkpoint} holds iteration {state['iteration']}, but the last evaluated "
                         f"checkpoint is {iterations[-1]}")
    points_dir = Path(args.points)
    points = [read_point(points_dir, it) for it in iterations]
    base, trained = points[0], points[-1]
    curves = curves_from(points)
    ids, texts, base_videos = read_videos(points_dir, iterations[0])
    _, _, trained_videos = read_videos(points_dir, iterations[-1])
    samples = [{"prompt_id": i, "prompt": t, "base": b.numpy(), "trained": v.numpy()}
               for i, t, b, v in zip(ids, texts, base_videos, trained_videos)]
    history = state.get("history", [])
    margin = reward_margin(base, trained)
    write_report(args.report, ReportInputs(
        as_entries(base), as_entries(trained), history, samples,
        title=f"Flash-GRPO evaluation: {params.preset}, iteration {state['iteration']}",
        fps=params.eval.fps, eval_curves=curves, margin=margin))
    write_curves(curves, args.curves)
    shared = [name for name in base["metrics"] if name in trained["metrics"]]
    write_json({"iteration": state["iteration"], "prompts": trained["prompts"], "use_ema": trained["use_ema"],
                "samples_per_prompt": trained.get("samples_per_prompt", 1),
                "num_steps": trained["num_steps"], "evaluated": list(iterations),
                "base": base["metrics"], "trained": trained["metrics"],
                "delta": {name: trained["metrics"][name] - base["metrics"][name] for name in shared},
                "reward_margin": margin, "not_configured": trained["not_configured"]},
               Path(args.report) / "evaluation.json")
    write_json(metric_record(base, trained, margin), args.metrics)
    write_json(history, args.history)
    interval = {} if margin is None else {"delta_95": f"[{margin['delta_low']:+.4f},{margin['delta_high']:+.4f}]"}
    return {"iteration": state["iteration"], "evaluated": len(points), "prompts": trained["prompts"],
            "reward_base": round(base["metrics"]["reward"], 4),
            "reward_trained": round(trained["metrics"]["reward"], 4), **interval}


if __name__ == "__main__":
    common.finish(main())
