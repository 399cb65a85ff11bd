"""What `dvc metrics show` / `dvc metrics diff` read for the default run: a few columns, numbers only."""

from pathlib import Path

from flash_grpo_core.config import load_params, read_yaml

ROOT = Path(__file__).resolve().parents[1]
VALUE_WIDTH = 7  # DVC prints metrics rounded to 5 digits: 0.56123
SEPARATOR = 3  # DVC's table: a column is its widest cell + 3 (measured: 117 columns for the default run)


def declared_metrics() -> list[str]:
    stages = read_yaml(ROOT / "dvc.yaml")["stages"]
    paths = []
    for stage in stages.values():
        for entry in stage.get("do", stage).get("metrics", []):
            paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def test_only_the_compared_numbers_are_metrics():
    """Per-iteration training reward and the evaluation; reports, curation counts, the update's full
    record and the evaluated points' notes are plain outputs."""
    assert sorted(declared_metrics()) == ["${pipeline.root}/${preset}/eval/metrics.json",
                                          "${pipeline.root}/${preset}/it${key}/score.json"]


def test_the_default_runs_metric_table_is_narrow_and_numeric():
    from stages.evaluate import metric_record, reward_margin

    params = load_params(ROOT / "params.yaml")
    assert len(params.reward.weights) == 1  # score.json then holds no per-reward means (stages/score.py)
    score = {"iteration": 1, "reward_mean": 0.56, "reward_std": 0.05}
    point = {"prompts": 2, "metrics": {"reward": 0.5, "reward/toy_following/color": 0.9, "temporal_flickering": 0.9},
             "per_video": {"reward": [0.4, 0.5, 0.6, 0.5]}, "not_configured": {"imaging_quality": "set a path"}}
    trained = {**point, "iteration": 6, "metrics": {**point["metrics"], "reward": 0.55},
               "per_video": {"reward": [0.5, 0.55, 0.6, 0.55]}}
    evaluation = flatten(metric_record({**point, "iteration": 0}, trained, reward_margin(point, trained)))
    assert all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in evaluation.values())
    assert evaluation["ci_low"] <= evaluation["delta"] <= evaluation["ci_high"]
    columns = sorted({*score, *evaluation})
    assert len(columns) <= 8, columns
    path = len(f"{params.pipeline.root}/{params.preset}/eval/metrics.json")
    width = path + 2 + sum(max(len(column), VALUE_WIDTH) + SEPARATOR for column in columns)
    assert width <= 120, (width, columns)  # `dvc metrics show`, every metric file of the run in one table
