"""`evaluate` stage: the final checkpoint against the base model on held-out prompts.

    python -m stages.evaluate --prompts runs/prompts/eval.parquet --base runs/tiny/it0/checkpoint \
        --checkpoint runs/tiny/it2/checkpoint --report runs/tiny/eval/report \
        --metrics runs/tiny/eval/metrics.json --history runs/tiny/eval/history.json

Both models sample with the deterministic ODE sampler (`eval.num_steps`, `eval.guidance`), the EMA
weights when `eval.use_ema`, and the same noise per prompt (`eval.seed`). Scores both with the
training reward(s) and the VBench-style dimensions (`eval.metrics`), writes metrics.json (base,
trained, delta), the training history for `dvc plots`, and an HTML report with base | trained
videos for the first `eval.report_samples` prompts.
"""

from __future__ import annotations

import contextlib
import sys

from stages import _common


def main(argv=None) -> int:
    parser = _common.parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True, help="eval.parquet from the curate stage")
    parser.add_argument("--base", required=True, help="the iteration-0 checkpoint")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to evaluate")
    parser.add_argument("--report", required=True, help="directory for report.html and its videos")
    parser.add_argument("--metrics", required=True, help="metrics.json to write")
    parser.add_argument("--history", required=True, help="history.json (training curves) to write")
    args = parser.parse_args(argv)
    return _common.run("evaluate", lambda: evaluate(args))


def _sample(engine, texts, params):
    from flash_grpo_core.iteration import sample_ode

    context = engine.policy.ema.applied() if params.eval.use_ema else contextlib.nullcontext()
    with context:
        return sample_ode(engine, texts, params.eval.num_steps, params.eval.guidance, params.eval.seed)


def _score(videos, texts, params) -> dict:
    """Reward entries and VBench-style dimensions of one model's videos."""
    from flash_grpo_core.iteration import reward_from_params
    from flash_grpo_core.metrics import evaluate_videos, reward_entries

    return {**reward_entries(reward_from_params(params)(videos, texts)),
            **evaluate_videos(videos, texts, dict(params.eval.metrics))}


def evaluate(args) -> dict:
    from flash_grpo_core.atomic import write_json
    from flash_grpo_core.checkpoint import load_checkpoint
    from flash_grpo_core.metrics import summary
    from flash_grpo_core.prompts import read_prompts_parquet
    from flash_grpo_core.report import write_report

    params = _common.load_params(args.params)
    prompts = read_prompts_parquet(args.prompts)[: params.eval.num_prompts]
    texts = [p.prompt for p in prompts]
    engine, _ = _common.engine_at(params, args.base)
    base_videos = _sample(engine, texts, params)
    state = load_checkpoint(engine.policy, args.checkpoint)
    trained_videos = _sample(engine, texts, params)
    base, trained = _score(base_videos, texts, params), _score(trained_videos, texts, params)
    base_summary, trained_summary = summary(base), summary(trained)
    history = state.get("history", [])
    samples = [{"prompt_id": p.id, "prompt": p.prompt, "base": b, "trained": t}
               for p, b, t in list(zip(prompts, base_videos, trained_videos))[: params.eval.report_samples]]
    write_report(args.report, base, trained, history, samples,
                 title=f"Flash-GRPO evaluation: {params.preset}, iteration {state['iteration']}", fps=params.eval.fps)
    not_configured = {name: result["reason"] for name, result in base.items() if result["status"] != "ok"}
    write_json({"iteration": state["iteration"], "prompts": len(prompts), "use_ema": params.eval.use_ema,
                "num_steps": params.eval.num_steps, "base": base_summary, "trained": trained_summary,
                "delta": {k: trained_summary[k] - base_summary[k] for k in base_summary if k in trained_summary},
                "not_configured": not_configured}, args.metrics)
    write_json(history, args.history)
    return {"iteration": state["iteration"], "prompts": len(prompts),
            "reward_base": round(base_summary["reward"], 4), "reward_trained": round(trained_summary["reward"], 4)}


if __name__ == "__main__":
    sys.exit(main())
