"""`evaluate` stage: the final checkpoint against the base model on held-out prompts.

    python -m stages.evaluate --prompts runs/prompts/eval.parquet --base runs/tiny/it0/checkpoint \
        --checkpoint runs/tiny/it2/checkpoint --samples runs/tiny/eval/samples \
        --metrics runs/tiny/eval/metrics.json --history runs/tiny/eval/history.json

Both models sample with the deterministic ODE sampler (`eval.num_steps`, `eval.guidance`), the EMA
weights when `eval.use_ema`, and the same noise per prompt (`eval.seed`). Reports the mean of each
reward component for both and the delta; writes base | trained GIFs per prompt and the training
history (one row per iteration) for `dvc plots`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from stages import _common


def main(argv=None) -> int:
    parser = _common.parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True, help="eval.parquet from the curate stage")
    parser.add_argument("--base", required=True, help="the iteration-0 checkpoint")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to evaluate")
    parser.add_argument("--samples", required=True, help="directory for the sample GIFs")
    parser.add_argument("--metrics", required=True, help="metrics.json to write")
    parser.add_argument("--history", required=True, help="history.json (training curves) to write")
    args = parser.parse_args(argv)
    return _common.run("evaluate", lambda: evaluate(args))


def _sample(engine, texts, params):
    from flash_grpo_core.iteration import sample_ode

    context = engine.policy.ema.applied() if params.eval.use_ema else contextlib.nullcontext()
    with context:
        return sample_ode(engine, texts, params.eval.num_steps, params.eval.guidance, params.eval.seed)


def evaluate(args) -> dict:
    from flash_grpo_core.atomic import write_json
    from flash_grpo_core.checkpoint import load_checkpoint
    from flash_grpo_core.iteration import reward_from_params
    from flash_grpo_core.media import side_by_side, write_gif
    from flash_grpo_core.prompts import read_prompts_parquet

    params = _common.load_params(args.params)
    prompts = read_prompts_parquet(args.prompts)[: params.eval.num_prompts]
    texts = [p.prompt for p in prompts]
    engine, _ = _common.engine_at(params, args.base)
    base_videos = _sample(engine, texts, params)
    state = load_checkpoint(engine.policy, args.checkpoint)
    final_videos = _sample(engine, texts, params)
    reward = reward_from_params(params)
    results = {}
    for label, videos in (("base", base_videos), ("trained", final_videos)):
        output = reward(videos, texts)
        results[label] = {"reward": float(output.scores.mean()),
                          **{name: float(output.info[name].float().mean()) for name in params.reward.weights}}
    results["delta"] = {key: results["trained"][key] - results["base"][key] for key in results["base"]}
    samples = Path(args.samples)
    for prompt, base, final in zip(prompts, base_videos, final_videos):
        write_gif(side_by_side(base, final), samples / f"{prompt.id}-base_vs_trained.gif")
    write_json({"iteration": state["iteration"], "prompts": len(prompts), "use_ema": params.eval.use_ema,
                "num_steps": params.eval.num_steps, **results,
                "samples": {p.id: p.prompt for p in prompts}}, args.metrics)
    write_json(state.get("history", []), args.history)
    return {"iteration": state["iteration"], "prompts": len(prompts),
            "reward_base": round(results["base"]["reward"], 4), "reward_trained": round(results["trained"]["reward"], 4)}


if __name__ == "__main__":
    sys.exit(main())
