"""`update@k` stage: the rectified GRPO update of iteration k -> checkpoint k and metrics.json.

    python -m stages.update --iteration 1 --checkpoint runs/tiny/it0/checkpoint \
        --rollout runs/tiny/it1/rollout --scores runs/tiny/it1/scores.parquet \
        --out runs/tiny/it1/checkpoint --metrics runs/tiny/it1/metrics.json

The checkpoint carries the per-iteration metrics history so evaluation can plot it, and the params
that shaped its weights (`config`). Timings go to `--timings`, a file DVC does not track: in the
checkpoint or metrics.json they would change their hashes on every run. On several
processes every rank reads all the records (not the videos) and trains on its share of each
minibatch under DistributedDataParallel (flash_grpo_core/engine/trainer.py); rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

from stages.runtime import common


def read_manifest(rollout: str) -> dict:
    """The rollout's manifest.json; a ShardError naming it when it is missing or not the manifest."""
    from flash_grpo_core.artifacts.atomic import loads_finite
    from flash_grpo_core.artifacts.tar_io import ShardError

    path = Path(rollout) / "manifest.json"
    try:
        manifest = loads_finite(path.read_text())
        int(manifest["forward_passes"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ShardError(f"cannot read the rollout's manifest {path}: {type(error).__name__}: {error} "
                         f"(rerun its rollout stage)") from error
    return manifest


def main(argv=None) -> int:
    parser = common.parser("update", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--checkpoint", required=True, help="the previous iteration's checkpoint")
    parser.add_argument("--rollout", required=True, help="this iteration's shard directory")
    parser.add_argument("--scores", required=True, help="this iteration's scores.parquet")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--metrics", required=True, help="metrics.json to write")
    parser.add_argument("--timings", help="JSON file for the stage's timings (untracked; optional)")
    args = parser.parse_args(argv)
    return common.run("update", work, args, argv, distributed=True)


def work(args) -> dict:
    """Train on the scored rollouts; rank 0 writes the checkpoint and metrics.json."""
    from flash_grpo_core.artifacts.checkpoint import check_config
    from flash_grpo_core.engine.distributed import sum_counts
    from flash_grpo_core.engine.iteration import update
    from flash_grpo_core.method.advantages import NonFiniteError
    from flash_grpo_core.method.batch import PassCounter
    from flash_grpo_core.pipeline.health import act_on, check_health

    params = common.load_params(args.params)
    check_config(args.checkpoint, params)  # before the model loads: a checkpoint of other params
    rollout = read_manifest(args.rollout)  # before the model loads too
    timings, counter = {}, PassCounter()
    with common.timer(timings, "load_seconds"):
        engine, previous, inputs = _load(args, params)
    batch, prompts, embeds, records, scores, advantages = inputs
    with common.timer(timings, "train_seconds"), common.progress_bar(batch.steps.numel(), "update") as bar:
        try:
            metrics = update(engine, prompts, batch, advantages, args.iteration, counter, progress=bar,
                             embeds=embeds)
        except NonFiniteError as error:  # exit 2, naming the iteration: a rerun would meet it again
            raise NonFiniteError(f"iteration {args.iteration}: {error}") from error
    passes = sum_counts(counter.as_dict())  # every rank's share of the passes
    row = {"iteration": args.iteration, **_statistics(params, scores, records, batch.steps, advantages, metrics),
           "learning_rate": params.train.learning_rate,
           "ema_decay": engine.policy.ema.current_decay(engine.policy.ema.steps),  # the last optimizer step's fold
           "rollout_forward_passes": rollout["forward_passes"], "train_forward_passes": passes["forward_passes"],
           "train_backward_passes": passes["backward_passes"]}
    history = previous.get("history", [])
    # every rank checks the same numbers (a guard set to stop stops them all); rank 0 says it
    row["health_warnings"] = act_on(check_health(row, history, params.health), args.iteration,
                                    _warn_on_rank_0)
    _save(args, params, engine, [*history, row], timings, scores, len(records))
    return {k: round(row[k], 4) if isinstance(row[k], float) else row[k]
            for k in ("iteration", "reward_mean", "reward_std", "loss", "clip_fraction", "train_forward_passes",
                      "train_backward_passes")}


def _load(args, params):
    """The engine at the checkpoint (no text encoder: the prompts come as the embeddings the rollout
    sampled with), its state, and the iteration's inputs: (batch, prompts, embeddings, records,
    the score table, advantages aligned to the records), the score table read once."""
    from flash_grpo_core.artifacts.prompt_embeds import load_prompt_embeds
    from flash_grpo_core.artifacts.rollout_records import batch_from_records
    from flash_grpo_core.artifacts.scores import aligned_advantages, read_scores
    from flash_grpo_core.artifacts.shards import read_shards

    engine, previous = common.engine_at(params, args.checkpoint, text_encoder=False, optimizer=True)
    records = read_shards(args.rollout)
    batch, prompts, _ = batch_from_records(records)
    embeds = load_prompt_embeds(args.rollout, prompts, engine.device)
    scores = read_scores(args.scores)
    advantages = aligned_advantages(scores, [r.key for r in records], args.scores)
    return engine, previous, (batch, prompts, embeds, records, scores, advantages)


def _statistics(params, scores: dict, records, steps, advantages, metrics: dict) -> dict:
    """The rewards' and advantages' statistics, the update's metrics and its per-step picture."""
    mean, std = _mean_std(scores["reward"])
    equal = advantages.reshape(-1, params.rollout.group_size).eq(0).all(dim=1)  # groups without signal
    per_step = with_reward_spread(metrics["per_step"], steps, _aligned(scores, records), params.rollout.group_size)
    return {"reward_mean": mean, "reward_std": std, **metrics, "per_step": per_step,
            "equal_groups_fraction": float(equal.float().mean()), "advantage_abs_mean": float(advantages.abs().mean()),
            "advantage_min": float(advantages.min()), "advantage_max": float(advantages.max())}


def _save(args, params, engine, history: list[dict], timings: dict, scores: dict, videos: int) -> None:
    """Every rank gathers the (possibly sharded) tensors; rank 0 writes the checkpoint (its history
    ending with this iteration's row), metrics.json, the timings, and logs to the tracker."""
    from flash_grpo_core.artifacts.atomic import write_json
    from flash_grpo_core.artifacts.checkpoint import config_record, prune_moments, write_checkpoint
    from flash_grpo_core.engine.distributed import current
    from flash_grpo_core.pipeline.tracking import cost

    tensors = engine.policy.checkpoint_tensors()  # every rank: sharded (FSDP2) tensors are gathered
    if not current().is_main:
        return
    beside = params.train.optimizer_state == "beside"
    write_checkpoint(tensors, args.out, {"iteration": args.iteration, "preset": params.preset,
                                         "config": config_record(params), "history": history}, beside)
    if beside:
        prune_moments(args.out, params.train.keep_optimizer_states)
    write_json(history[-1], args.metrics)
    if args.timings:
        write_json(timings, args.timings)
    track(params, history[-1], _component_stats(scores), cost(timings, videos, current().size, "train_seconds"))


def with_reward_spread(per_step: dict, steps, rewards: list[float], group_size: int) -> dict[str, dict]:
    """The per-step picture of metrics.json, keyed "k<step>": the trainer's items and output gradient
    norm per trained step k, and its reward spread: the mean, over the items trained at k, of their
    group's reward std (0 where every sample of the group scored alike: no signal at that step)."""
    groups = [rewards[start:start + group_size] for start in range(0, len(rewards), group_size)]
    spread = [_mean_std(group)[1] for group in groups]
    at_step: dict[int, list[float]] = {}
    for sample, sample_steps in enumerate(steps.tolist()):  # [S, T]: every item of the rollout
        for k in sample_steps:
            at_step.setdefault(k, []).append(spread[sample // group_size])
    return {f"k{k}": {**per_step.get(k, {"items": 0.0}), "reward_spread": sum(values) / len(values)}
            for k, values in sorted(at_step.items())}


def _aligned(scores: dict[str, list], records) -> list[float]:
    """The rewards in the rollout's record order (the score table keys them)."""
    by_key = dict(zip(scores["key"], scores["reward"]))
    return [by_key[record.key] for record in records]


def _warn_on_rank_0(line: str) -> None:
    from flash_grpo_core.engine.distributed import current

    if current().is_main:
        common.warn("update", line)


def track(params, row: dict, components: dict[str, float], costs: dict[str, float]) -> None:
    """The iteration's numbers to the run's tracker (params.yaml's `tracking:`) at step = iteration:
    every number of the metrics row, each reward component's mean and std, the update's cost and the
    per-step picture (with_reward_spread)."""
    from flash_grpo_core.pipeline.tracking import open_tracker

    with open_tracker(params) as tracker:
        values = {key: value for key, value in row.items() if key not in ("iteration", "health_warnings", "per_step")}
        values["health_warnings"] = len(row["health_warnings"])  # how many guards warned (the lines: stderr, metrics.json)
        tracker.log_scalars({**values, "reward": components}, row["iteration"], prefix="train")
        tracker.log_scalars(costs, row["iteration"], prefix="cost/update", measured=True)
        tracker.log_scalars(row["per_step"], row["iteration"], prefix="steps")  # steps/k<k>/<number>


def _component_stats(scores: dict[str, list[float]]) -> dict[str, float]:
    """Each reward component's mean and std, from the score table's columns."""
    from flash_grpo_core.artifacts.scores import COMPONENT_PREFIX

    stats = {}
    for name, values in scores.items():
        if name.startswith(COMPONENT_PREFIX) and values:
            component = name[len(COMPONENT_PREFIX):]
            stats[f"{component}_mean"], stats[f"{component}_std"] = _mean_std(values)
    return stats


def _mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the population std, in the row's summation order."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


if __name__ == "__main__":
    common.finish(main())
