"""`score@k` stage: rewards and advantages of iteration k's rollouts -> scores.parquet.

    python -m stages.score --iteration 1 --rollout runs/tiny/it1/rollout \
        --out runs/tiny/it1/scores.parquet --summary runs/tiny/it1/score.json \
        --reward-state-in runs/tiny/it0/reward_state.json --reward-state-out runs/tiny/it1/reward_state.json

One row per sample: key, prompt id, group index, total reward, each reward component, advantage.
Each component's batch mean is checked against its history over earlier iterations (a reward on a
wildly different scale fails the stage naming the reward); the history is carried from iteration
to iteration in reward_state.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import _common


def main(argv=None) -> int:
    parser = _common.parser("score", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--rollout", required=True, help="the rollout stage's shard directory")
    parser.add_argument("--out", required=True, help="scores.parquet to write")
    parser.add_argument("--summary", required=True, help="score.json (metrics) to write")
    parser.add_argument("--reward-state-in", required=True, help="the previous iteration's reward_state.json")
    parser.add_argument("--reward-state-out", required=True, help="this iteration's reward_state.json")
    args = parser.parse_args(argv)

    def body():
        from flash_grpo_core.artifacts.atomic import write_json
        from flash_grpo_core.artifacts.rollout_records import batch_from_records
        from flash_grpo_core.artifacts.scores import write_scores
        from flash_grpo_core.artifacts.shards import read_shards, read_videos
        from flash_grpo_core.engine.iteration import advantages_for, reward_from_params, score

        params = _common.load_params(args.params)
        records = read_shards(args.rollout)
        batch, prompts, _ = batch_from_records(records)
        videos = read_videos(args.rollout, [record.key for record in records])
        reward = reward_from_params(params, scale_guard=True)
        reward.load_state_dict(json.loads(Path(args.reward_state_in).read_text()))
        rewards, info = score(reward, videos, prompts, batch)
        advantages = advantages_for(params, rewards)
        components = {name: info[name] for name in params.reward.weights}
        write_scores(args.out, records, rewards, advantages, components)
        summary = {"iteration": args.iteration, "reward_mean": float(rewards.mean()),
                   "reward_std": float(rewards.std(unbiased=False)),
                   **{f"{name}_mean": float(values.float().mean()) for name, values in components.items()}}
        write_json(summary, args.summary)
        write_json(reward.state_dict(), args.reward_state_out)
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in summary.items()}

    return _common.run("score", body)


if __name__ == "__main__":
    _common.finish(main())
