"""`eval_checkpoint@k` stage: one checkpoint on the held-out prompts, for metrics over iterations.

    python -m stages.eval_checkpoint --iteration 2 --prompts runs/prompts/eval.parquet \
        --checkpoint runs/tiny/it2/checkpoint --metrics runs/tiny/eval/points/it2/metrics.json \
        --videos runs/tiny/eval/points/it2/videos.safetensors

Samples the first `eval.num_prompts` eval prompts (more than the eval set holds is an error naming
the key, not silently fewer) `eval.samples_per_prompt` times each (sample s of prompt i is video s * P + i), with the
deterministic ODE sampler (`eval.num_steps`, `eval.guidance`), the EMA weights when `eval.use_ema`,
and the same noise per video at every checkpoint (`eval.seed`), so points differ only by their
weights. Scores them with the training reward(s) and the VBench-style dimensions (`eval.metrics`);
writes metrics.json (the mean of each metric, each reward's per-video values for the evaluation's
paired interval, and the reason for each dimension that is not configured) and the first
`eval.report_samples` videos for the report (uint8 safetensors, prompt ids in the metadata).
Iteration 0 is the base model. On several processes the ranks split the prompts (each keeps its
noise) and rank 0 writes.
"""

from __future__ import annotations

import contextlib

from stages.runtime import common


def main(argv=None) -> int:
    parser = common.parser("eval_checkpoint", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True, help="the checkpoint's iteration (0: the base)")
    parser.add_argument("--prompts", required=True, help="eval.parquet from the curate stage")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to evaluate")
    parser.add_argument("--metrics", required=True, help="metrics.json to write")
    parser.add_argument("--videos", required=True, help="videos.safetensors (report samples) to write")
    args = parser.parse_args(argv)
    return common.run("eval_checkpoint", work, args, argv, distributed=True)


def evaluate_units(engine, texts: list[str], params, reward) -> tuple[dict, list]:
    """Metric results and report videos of this rank's prompts, every rank's gathered in order.

    The prompts are evaluated in units of `rollout.batch_size` (the sampler's batch), dealt to the
    ranks; every prompt keeps its noise, and one process evaluates unit by unit too, so the numbers
    do not depend on the number of processes. Only the report's first videos travel between ranks."""
    import torch

    from flash_grpo_core.engine import distributed as dist
    from flash_grpo_core.engine.iteration import encode, sample_ode
    from flash_grpo_core.metrics import evaluate_videos, merge_results, reward_entries

    size = params.rollout.batch_size
    units = [range(start, min(start + size, len(texts))) for start in range(0, len(texts), size)]
    context = engine.policy.ema.applied() if params.eval.use_ema else contextlib.nullcontext()
    mine = {}
    with context:
        embeds = encode(engine, texts)
        for number in dist.owned_units(len(units), dist.current()):
            unit = units[number]
            videos = sample_ode(engine, texts, params.eval.num_steps, params.eval.guidance, params.eval.seed,
                                unit, embeds)  # [b, F, H, W, 3]
            chosen = texts[unit.start:unit.stop]
            results = {**reward_entries(reward(videos, chosen)),
                       **evaluate_videos(videos, chosen, dict(params.eval.metrics))}
            mine[number] = (results, videos[: max(0, params.eval.report_samples - unit.start)])
    parts = dict(pair for part in dist.gather_objects(mine) for pair in part.items())
    return merge_results([parts[n][0] for n in sorted(parts)]), torch.cat([parts[n][1] for n in sorted(parts)])


def write_videos(videos, prompts, path: str) -> None:
    from flash_grpo_core.artifacts.safetensors_io import write_safetensors

    write_safetensors({"videos": videos[: len(prompts)]}, path,
                      {"prompt_ids": [p.id for p in prompts], "prompts": [p.prompt for p in prompts]})


TRACKED_SAMPLES = 3  # the report's first videos, one for each of the first held-out prompts


def track(params, iteration: int, means: dict, videos) -> None:
    """The checkpoint's held-out numbers (each reward and metric's mean) and its first sample
    videos (`eval/sample/<n>`) to the run's tracker (params.yaml's `tracking:`) at step = the
    checkpoint's iteration."""
    from flash_grpo_core.pipeline.tracking import open_tracker

    with open_tracker(params) as tracker:
        tracker.log_scalars(means, iteration, prefix="eval")
        for number, video in enumerate(videos[:TRACKED_SAMPLES]):
            tracker.log_video(f"eval/sample/{number}", video, iteration, fps=8)  # as the report's mp4s


def work(args) -> dict:
    """Sample and score the eval prompts with the checkpoint; rank 0 writes metrics.json and the videos."""
    from flash_grpo_core.artifacts.atomic import write_json
    from flash_grpo_core.artifacts.checkpoint import CheckpointError, check_config
    from flash_grpo_core.artifacts.prompts import read_prompts_parquet
    from flash_grpo_core.config import ConfigError
    from flash_grpo_core.engine.distributed import current
    from flash_grpo_core.engine.ema import unfolded_warning
    from flash_grpo_core.engine.iteration import reward_from_params
    from flash_grpo_core.metrics import summary

    params = common.load_params(args.params)
    available = read_prompts_parquet(args.prompts)
    if params.eval.num_prompts > len(available):
        raise ConfigError(f"eval.num_prompts: {params.eval.num_prompts}, but {args.prompts} holds only "
                          f"{len(available)} eval prompts: lower it or curate more (data section)")
    prompts = available[: params.eval.num_prompts]
    texts = [p.prompt for _ in range(params.eval.samples_per_prompt) for p in prompts]  # [S * P]
    check_config(args.checkpoint, params)  # before the model loads: a checkpoint of other params
    reward = reward_from_params(params)  # before the model loads too: a missing reward model's path
    engine, state = common.engine_at(params, args.checkpoint)
    if state["iteration"] != args.iteration:
        raise CheckpointError(f"{args.checkpoint} holds iteration {state['iteration']}, not {args.iteration}")
    if params.eval.use_ema and current().is_main:
        common.warn("eval_checkpoint", unfolded_warning(engine.policy.ema.steps, params.train.ema_every,
                                                         args.iteration, "eval.use_ema"))
    results, videos = evaluate_units(engine, texts, params, reward)
    means = summary(results)
    if current().is_main:
        write_videos(videos, prompts[: params.eval.report_samples], args.videos)
        write_json({"iteration": args.iteration, "prompts": len(prompts), "use_ema": params.eval.use_ema,
                    "samples_per_prompt": params.eval.samples_per_prompt,
                    "num_steps": params.eval.num_steps, "metrics": means,
                    "per_video": {name: r["per_video"] for name, r in results.items()
                                  if name.startswith("reward") and r["status"] == "ok"},
                    "not_configured": {name: r["reason"] for name, r in results.items() if r["status"] != "ok"}},
                   args.metrics)
        track(params, args.iteration, means, videos)
    return {"iteration": args.iteration, "prompts": len(prompts), "reward": round(means["reward"], 4)}


if __name__ == "__main__":
    common.finish(main())
