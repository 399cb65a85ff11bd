"""`eval_checkpoint@k` stage: one checkpoint on the held-out prompts, for metrics over iterations.

    python -m stages.eval_checkpoint --iteration 2 --prompts runs/prompts/eval.parquet \
        --checkpoint runs/tiny/it2/checkpoint --metrics runs/tiny/eval/points/it2/metrics.json \
        --videos runs/tiny/eval/points/it2/videos.safetensors

Samples the first `eval.num_prompts` eval prompts with the deterministic ODE sampler
(`eval.num_steps`, `eval.guidance`), the EMA weights when `eval.use_ema`, and the same noise per
prompt at every checkpoint (`eval.seed`), so points differ only by their weights. Scores them with
the training reward(s) and the VBench-style dimensions (`eval.metrics`); writes metrics.json (the
mean of each metric, and the reason for each dimension that is not configured) and the first
`eval.report_samples` videos for the report (uint8 safetensors, prompt ids in the metadata).
Iteration 0 is the base model.
"""

from __future__ import annotations

import contextlib

from stages import _common


def main(argv=None) -> int:
    parser = _common.parser("eval_checkpoint", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True, help="the checkpoint's iteration (0: the base)")
    parser.add_argument("--prompts", required=True, help="eval.parquet from the curate stage")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to evaluate")
    parser.add_argument("--metrics", required=True, help="metrics.json to write")
    parser.add_argument("--videos", required=True, help="videos.safetensors (report samples) to write")
    args = parser.parse_args(argv)
    return _common.run("eval_checkpoint", lambda: evaluate_checkpoint(args))


def sample(engine, texts: list[str], params):
    """uint8 videos [B, F, H, W, 3] from the ODE sampler with the eval settings and fixed noise."""
    from flash_grpo_core.engine.iteration import sample_ode

    context = engine.policy.ema.applied() if params.eval.use_ema else contextlib.nullcontext()
    with context:
        return sample_ode(engine, texts, params.eval.num_steps, params.eval.guidance, params.eval.seed)


def score(videos, texts: list[str], params) -> dict:
    """Reward entries and VBench-style dimensions of the videos (flash_grpo_core.metrics' entries)."""
    from flash_grpo_core.engine.iteration import reward_from_params
    from flash_grpo_core.metrics import evaluate_videos, reward_entries

    return {**reward_entries(reward_from_params(params)(videos, texts)),
            **evaluate_videos(videos, texts, dict(params.eval.metrics))}


def write_videos(videos, prompts, path: str) -> None:
    from flash_grpo_core.artifacts.atomic import write_safetensors

    write_safetensors({"videos": videos[: len(prompts)]}, path,
                      {"prompt_ids": [p.id for p in prompts], "prompts": [p.prompt for p in prompts]})


def evaluate_checkpoint(args) -> dict:
    from flash_grpo_core.artifacts.atomic import write_json
    from flash_grpo_core.artifacts.checkpoint import CheckpointError
    from flash_grpo_core.artifacts.prompts import read_prompts_parquet
    from flash_grpo_core.metrics import summary

    params = _common.load_params(args.params)
    prompts = read_prompts_parquet(args.prompts)[: params.eval.num_prompts]
    texts = [p.prompt for p in prompts]
    engine, state = _common.engine_at(params, args.checkpoint)
    if state["iteration"] != args.iteration:
        raise CheckpointError(f"{args.checkpoint} holds iteration {state['iteration']}, not {args.iteration}")
    videos = sample(engine, texts, params)
    results = score(videos, texts, params)
    means = summary(results)
    write_videos(videos, prompts[: params.eval.report_samples], args.videos)
    write_json({"iteration": args.iteration, "prompts": len(prompts), "use_ema": params.eval.use_ema,
                "num_steps": params.eval.num_steps, "metrics": means,
                "not_configured": {name: r["reason"] for name, r in results.items() if r["status"] != "ok"}},
               args.metrics)
    return {"iteration": args.iteration, "prompts": len(prompts), "reward": round(means["reward"], 4)}


if __name__ == "__main__":
    _common.finish(main())
