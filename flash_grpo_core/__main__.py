"""Run a few Flash-GRPO iterations in one process and print their metrics.

    python -m flash_grpo_core [--params params.yaml] [--preset tiny] [--iterations N] [--prompts FILE]

The smallest end-to-end use of the core: the prompts of a prompt source (default: the params'
`data.source`, the file the pipeline's curate stage reads; .txt, .jsonl or .parquet), the
configured reward, and `run_iteration` per iteration. The staged, cached pipeline (`dvc repro`) is
the production path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _build(params):
    """(engine, reward); the reward first: a missing reward model fails before the video model loads.
    A reward or model-path error is a ConfigError here: both are fixed in params.yaml."""
    from flash_grpo_core.config import ConfigError
    from flash_grpo_core.engine.iteration import build_engine, reward_from_params
    from flash_grpo_core.models.wan import ModelPathError
    from flash_grpo_core.rewards import RewardError

    try:
        reward = reward_from_params(params)
        return build_engine(params), reward
    except (RewardError, ModelPathError) as error:
        raise ConfigError(str(error)) from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_grpo_core", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--iterations", type=positive, default=None, help="default: the params' iterations")
    parser.add_argument("--prompts", default=None, help="a prompt source (default: the params' data.source)")
    args = parser.parse_args(argv)

    from flash_grpo_core.artifacts.prompt_sources import PromptFileError, read_prompt_file
    from flash_grpo_core.config import ConfigError, load_params

    try:
        params = load_params(args.params, preset=args.preset)
        prompts = [raw.text for raw in read_prompt_file(args.prompts or params.data.source) if raw.text.strip()]
        if not prompts:
            raise PromptFileError(f"{args.prompts or params.data.source}: no prompts")
        engine, reward = _build(params)
    except (ConfigError, PromptFileError) as error:
        print(f"run: error: {error}", file=sys.stderr)
        return 2
    from flash_grpo_core.engine.iteration import run_iteration

    per_iteration = params.rollout.prompts_per_iteration
    for iteration in range(args.iterations or params.iterations):
        start = iteration * per_iteration
        batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(per_iteration)]
        began = time.perf_counter()
        metrics = run_iteration(engine, batch_prompts, reward, iteration)
        metrics["seconds"] = round(time.perf_counter() - began, 3)
        print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
