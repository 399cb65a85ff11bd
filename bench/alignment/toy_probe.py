"""Where a toy base fails: its reward components from pure noise and from real clips noised to sigma.

    python -m bench.alignment.toy_probe        # the shipped base (bench/toy/base), params.yaml's toy preset
    python -m bench.alignment.toy_probe --base DIR --name sq8 --set toy.square=8 \\
        --set 'reward.options={"toy_following": {"square": 8, "speed": 1}}'

For the train prompts the base was pre-trained on, those it was not (`toy.rl_only`: GRPO's reward
alone teaches them) and the held-out prompts of the toy task (flash_grpo_core/tasks/toy/), --samples
videos per prompt:
- `noise`: the evaluation's ODE samples (eval.num_steps, eval.guidance, eval.seed), what the
  alignment benchmark scores;
- `sigma s`: each video's own clip of the task (`toy.make_clips`) noised to sigma s, as the
  pre-training loss noises it, and integrated back to sigma 0 with eval.num_steps Euler steps
  spaced as the shifted schedule is (`interval_sigmas`), same guidance.
A base that keeps a component from a clip noised to 0.6 but not from pure noise fails at the
high-noise steps, where the frames' common layout is decided; a component lost from every sigma is
a skill the base lacks. Writes bench/results/toy_probe[-NAME].{json,md} (--out-dir).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# importable once the project root is on the path
from bench.alignment.alignment import COMPONENTS, SHIPPED_BASE, _overrides, evaluate, scored
from bench.results_io import RESULTS, write_results

SIGMAS = (0.9, 0.8, 0.6, 0.4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.toy_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(SHIPPED_BASE), help="toy base directory (transformer.safetensors)")
    parser.add_argument("--samples", type=int, default=8, help="videos per prompt and start")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key (dotted, YAML value), as bench/alignment/alignment.py does")
    parser.add_argument("--name", default=None, help="suffix of the result files")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.overrides = _overrides(parser, args.set)
    if args.samples < 1 or not all(0 < s <= 1 for s in args.sigmas):
        parser.error("--samples must be >= 1 and every --sigmas value in (0, 1]")
    return args


def from_clips(engine, prompts: list[str], sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Videos uint8 [B, F, H, W, 3]: each prompt's clip noised to `sigma`, integrated back to 0."""
    from flash_grpo_core.tasks import toy
    from flash_grpo_core.engine.iteration import decode, encode
    from flash_grpo_core.engine.sampler import predict_velocity
    from flash_grpo_core.method.schedule import interval_sigmas

    params = engine.params
    clips = toy.make_clips(prompts, params.toy, generator)  # [B, 3, F, H, W], the toy's pixel space
    latents = (1 - sigma) * clips + sigma * torch.randn(clips.shape, generator=generator)
    cond, uncond = encode(engine, prompts)
    schedule = interval_sigmas(sigma, 0.0, params.eval.num_steps, params.rollout.shift)
    with torch.no_grad(), engine.policy.ema.applied():
        for high, low in itertools.pairwise(schedule):
            at = torch.full((len(prompts),), float(high), dtype=torch.float64)
            velocity = predict_velocity(engine.policy.transformer, latents, at, cond, uncond, params.eval.guidance)
            latents = latents + float(low - high) * velocity.float()
    return decode(engine, latents)


def probe(args) -> list[dict]:
    from flash_grpo_core.tasks import toy
    from flash_grpo_core.config import load_params
    from flash_grpo_core.engine.iteration import build_engine, reward_from_params

    params = load_params(ROOT / "params.yaml", preset="toy",
                         overrides={**args.overrides, "model.path": args.base, "model.device": "cpu"})
    if params.rollout.frames != params.toy.frames:
        sys.exit("toy_probe: rollout.frames must equal toy.frames (the clips are the task's)")
    engine, reward = build_engine(params), reward_from_params(params)

    def row(split: str, start: str, scores: dict[str, float]) -> dict:
        return {"prompts": split, "start": start, **{key: round(value, 4) for key, value in scores.items()}}

    splits = {"train": toy.pretrain_prompts(params.toy), "rl_only": toy.rl_only_prompts(params.toy),
              "held_out": toy.toy_prompts(params.toy)[1]}
    rows = []
    for split, prompts in splits.items():
        if not prompts:
            continue
        rows.append(row(split, "noise", evaluate(engine, prompts, args.samples)))  # what the benchmark scores
        repeated = [p for _ in range(args.samples) for p in prompts]
        generator = torch.Generator().manual_seed(params.eval.seed)
        for sigma in args.sigmas:
            rows.append(row(split, f"sigma {sigma:g}", scored(reward, from_clips(engine, repeated, sigma, generator),
                                                              repeated)))
    return rows


def markdown(rows: list[dict], base: str, args) -> str:
    lines = [f"# Toy base probe: {base}", "",
             (f"{args.samples} videos per prompt and start; overrides: {args.overrides or 'none'}. `noise`: the "
             f"evaluation's ODE samples; `sigma s`: the prompt's own clip noised to s and integrated back."), "",
             "| prompts | start | reward | " + " | ".join(COMPONENTS) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in COMPONENTS) + " |"]
    lines += [f"| {r['prompts']} | {r['start']} | {r['reward']:.3f} | " + " | ".join(f"{r[c]:.3f}" for c in COMPONENTS)
              + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = probe(args)
    base = Path(args.base).resolve()
    base = base.relative_to(ROOT).as_posix() if base.is_relative_to(ROOT) else base.name  # no machine paths
    text = markdown(rows, base, args)
    # key-sorted, non-ASCII kept: the format of flash_grpo_core.artifacts.atomic.write_json it had
    write_results(f"toy_probe{'-' + args.name if args.name else ''}",
                  {"base": base, "samples": args.samples, "overrides": args.overrides, "rows": rows}, text,
                  args.out_dir, sort_keys=True, ensure_ascii=False)
    print(text)


if __name__ == "__main__":
    main()
