"""`score@k` stage: rewards and advantages of iteration k's rollouts -> scores.parquet.

    python -m stages.score --iteration 1 --rollout runs/tiny/it1/rollout \
        --out runs/tiny/it1/scores.parquet --summary runs/tiny/it1/score.json \
        --reward-state-in runs/tiny/it0/reward_state.json --reward-state-out runs/tiny/it1/reward_state.json

One row per sample: key, prompt id, group index, total reward, each reward component, advantage.
Each component's batch mean is checked against its history over earlier iterations (a reward on a
wildly different scale fails the stage naming the reward); the history is carried from iteration
to iteration in reward_state.json.

On several processes each rank scores whole shards of its own (HPSv3 is a 7B model: every GPU
scores); the components are gathered, and every rank weights them, checks their scale and computes
the global advantages, so the guards' state stays the same everywhere; rank 0 writes.
"""

from __future__ import annotations

from stages.runtime import common


def main(argv=None) -> int:
    parser = common.parser("score", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--rollout", required=True, help="the rollout stage's shard directory")
    parser.add_argument("--out", required=True, help="scores.parquet to write")
    parser.add_argument("--summary", required=True, help="score.json (metrics) to write")
    parser.add_argument("--reward-state-in", required=True, help="the previous iteration's reward_state.json")
    parser.add_argument("--reward-state-out", required=True, help="this iteration's reward_state.json")
    args = parser.parse_args(argv)
    return common.run("score", work, args, argv, distributed=True)


def work(args) -> dict:
    """Score the rollouts and compute the advantages; rank 0 writes scores.parquet and the reward state."""
    from flash_grpo_core.artifacts.atomic import read_json_object, write_json
    from flash_grpo_core.artifacts.scores import write_scores
    from flash_grpo_core.engine import distributed as dist
    from flash_grpo_core.engine.iteration import advantages_for, reward_from_params
    from flash_grpo_core.rewards import RewardError
    from flash_grpo_core.rewards.combined import concat_outputs

    params = common.load_params(args.params)
    reward = reward_from_params(params, scale_guard=True)
    reward.load_state_dict(read_json_object(args.reward_state_in, RewardError,
                                            "rerun the stage that wrote it: init or the previous score"))
    parts = dict(pair for part in dist.gather_objects(score_shards(reward, args.rollout)) for pair in part.items())
    samples = [sample for number in sorted(parts) for sample in parts[number][0]]
    output = reward.combine(concat_outputs([parts[number][1] for number in sorted(parts)]))  # every rank
    rewards, advantages = output.scores, advantages_for(params, output.scores)
    components = {name: output.info[name] for name in params.reward.weights}
    summary = {"iteration": args.iteration, "reward_mean": float(rewards.double().mean()),  # as update's
               "reward_std": float(rewards.double().std(unbiased=False)),
               # each reward's own mean only where several are combined (one would repeat reward_mean)
               **{f"{name}_mean": float(values.float().mean()) for name, values in components.items()
                  if len(components) > 1}}
    if dist.current().is_main:
        write_scores(args.out, samples, rewards, advantages, components)
        write_json(summary, args.summary)
        write_json(reward.state_dict(), args.reward_state_out)
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in summary.items()}


def score_shards(reward, rollout: str) -> dict:
    """{shard number: (its samples, each reward component's output on its videos)} for this rank's
    shards. Components are computed shard by shard on one process too, so the scores do not depend
    on the number of processes; weighting and the scale guard act on the whole batch afterwards."""
    from types import SimpleNamespace

    from flash_grpo_core.artifacts.shards import read_shards, read_videos, shard_count
    from flash_grpo_core.engine import distributed as dist

    parts = {}
    for number in dist.owned_units(shard_count(rollout), dist.current()):
        records = read_shards(rollout, [number])
        videos = read_videos(rollout, [record.key for record in records], [number])
        metadata = [{"prompt_index": record.prompt_index, "steps": record.steps.tolist()} for record in records]
        samples = [SimpleNamespace(key=r.key, prompt_id=r.prompt_id, iteration=r.iteration, group_index=r.group_index)
                   for r in records]
        parts[number] = (samples, reward.components_of(videos, [r.prompt for r in records], metadata))
    return parts


if __name__ == "__main__":
    common.finish(main())
