"""Run a few Flash-GRPO iterations in one process and print their metrics.

    python -m flash_grpo_core.run [--params params.yaml] [--preset tiny] [--iterations N]

The smallest end-to-end use of the core: prompts from a text file, the configured reward, and
`run_iteration` per iteration. The staged, cached pipeline (`dvc repro`) is the production path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def read_prompt_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file; a clear error when there are none."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} contains no prompts")
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--prompts", default="prompts/example.txt")
    args = parser.parse_args(argv)

    from flash_grpo_core.config import load_params
    from flash_grpo_core.engine.iteration import build_engine, reward_from_params, run_iteration

    params = load_params(args.params, preset=args.preset)
    prompts = read_prompt_lines(Path(args.prompts))
    engine = build_engine(params)
    reward = reward_from_params(params)
    per_iteration = params.rollout.prompts_per_iteration
    for iteration in range(args.iterations or params.iterations):
        start = iteration * per_iteration
        batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(per_iteration)]
        began = time.perf_counter()
        metrics = run_iteration(engine, batch_prompts, reward, iteration)
        metrics["seconds"] = round(time.perf_counter() - began, 3)
        print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
