"""Alignment benchmark: does one-step GRPO beat full-trajectory GRPO at equal compute? (toy task)

    python -m bench.alignment            # full run: 9 variants x 3 seeds
    python -m bench.alignment --first-seed 100 --seeds 3   # seeds 100-102 (tuning seeds, never reported)
    python -m bench.alignment --quick    # smoke size: 2 variants x 1 seed, the shipped base (a few minutes)
    python -m bench.alignment --jobs 2   # two runs at a time, one thread each (29 min on 2 cores)

(from the repository root; bench/alignment/__main__.py calls this module's `main`, so
`python -m bench.alignment.alignment` is the same.)

From one pre-trained pixel-space Wan base (the one shipped in bench/toy/base/, the frozen output
of `bench/toy/dvc.yaml:pretrain`; or with `--pretrain-steps N` a base of its own), every variant
trains until it has spent the same compute, counted in transformer forward-pass equivalents (a
forward = 1, a backward = 2; classifier-free guidance counts both halves), and is evaluated on
held-out prompt combinations at the same compute fractions: the ODE sampler, EMA weights, fixed
noise per (prompt, sample). Variants:
  flash                 one SDE step per rollout, iso-temporal, exact rectification (Flash-GRPO)
  flash-no-iso          the same, one step per sample instead of per prompt
  flash-no-rect         the same, no rectification
  flash-flowgrpo-rect   the same, with the partial factor s/sqrt(dt) (rectify: flow_grpo, this project's)
  window                MixGRPO's progressive window (train.mode window): SDE on 2 consecutive steps
                        of 0..N-2, the window moved one step every 4 iterations (MixGRPO: 4 steps
                        every 25 iterations, over a run of thousands; scaled so it sweeps the steps
                        within the benchmark's budget), no rectification
  window-k              SDE on a window of 2 steps inside flash's first K, moved every iteration
                        (train.mode window_k), no rectification
  full                  SDE on every step, training the first int(N x timestep_fraction), loss
                        averaged over them, no rectification (Flow-GRPO as published)
  nft                   DiffusionNFT (train.mode nft): ODE rollouts, each final sample re-noised at
                        9 of the 10 levels, implicit positive/negative loss, no guidance in training
  awm                   Advantage Weighted Matching (train.mode awm): the same rollouts and levels,
                        PPO's ratio on the flow-matching log-likelihood surrogate
  flash-fast            flash with cheaper rollouts: 1 UniPC step before step k, 2 after it
                        (rollout.head_steps 1, tail_steps 2; docs/decisions.md, "Cheaper rollouts")
  flash-fast3           the same with 3 UniPC steps after k (rollout.tail_steps 3)
  flash-fast-guide      the same with 3 steps after k, those below sigma 0.5 without guidance
                        (the default full run leaves these three out: pass --variants)
Also measured: the gradient-norm spread across timesteps per rectification mode, PPO clip
fractions, and reward hacking (a component that falls while the total rises).
Writes runs.csv, evals.csv, summary.json, alignment.png and alignment.md to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# importable once the project root is on the path
from bench.alignment.report import COMPONENTS, summarise, write_outputs

VARIANTS = {
    "flash": {"train.mode": "flash"},
    "flash-no-iso": {"train.mode": "flash", "rollout.iso_temporal": False},
    "flash-no-rect": {"train.mode": "flash", "train.rectify": "none"},
    "flash-flowgrpo-rect": {"train.mode": "flash", "train.rectify": "flow_grpo"},
    "window": {"train.mode": "window", "train.rectify": "none", "train.window_size": 2, "train.window_every": 4},
    "window-k": {"train.mode": "window_k", "train.rectify": "none", "train.window_size": 2, "train.window_every": 1},
    "full": {"train.mode": "full", "train.rectify": "none"},
    # the forward-process successors: ODE rollouts, final samples re-noised at int(10 x 0.99) = 9 levels; a
    # group's samples need their own initial noise (from a shared one the ODE gives one video a group)
    "nft": {"train.mode": "nft", "train.rectify": "none", "train.timestep_fraction": 0.99,
            "rollout.same_initial_noise": False},
    "awm": {"train.mode": "awm", "train.rectify": "none", "train.timestep_fraction": 0.99,
            "rollout.same_initial_noise": False},
    # cheaper rollouts (docs/decisions.md, "Cheaper rollouts"): run with --variants, not by default
    "flash-fast": {"train.mode": "flash", "rollout.head_steps": 1, "rollout.tail_steps": 2},
    "flash-fast3": {"train.mode": "flash", "rollout.head_steps": 1, "rollout.tail_steps": 3},
    "flash-fast-guide": {"train.mode": "flash", "rollout.head_steps": 1, "rollout.tail_steps": 3,
                         "rollout.guidance_until": 0.5},
}
DEFAULT_VARIANTS = ("flash", "flash-no-iso", "flash-no-rect", "flash-flowgrpo-rect", "window", "window-k", "full",
                    "nft", "awm")


def compute_units(metrics: dict) -> int:
    """Forward-pass equivalents of one iteration: forwards + 2 x backwards."""
    return metrics["rollout_forward_passes"] + metrics["train_forward_passes"] + 2 * metrics["train_backward_passes"]


def flash_iteration_cost() -> int:
    """Forward-pass equivalents of one flash iteration of the toy preset (the budget's unit)."""
    from flash_grpo_core.config import load_params

    r = load_params(ROOT / "params.yaml", preset="toy").rollout
    samples, guided = r.prompts_per_iteration * r.group_size, 2 if r.guidance != 1.0 else 1
    return samples * guided * (r.num_steps + 1 + 2)  # N rollout forwards, one trained step: forward + 2 x backward


def evaluate(engine, prompts: list[str], samples: int) -> dict[str, float]:
    """Held-out reward (total and components) of ODE samples with the EMA weights, fixed noise."""
    from flash_grpo_core.engine.iteration import reward_from_params, sample_ode

    params = engine.params
    repeated = [p for _ in range(samples) for p in prompts]
    with engine.policy.ema.applied():
        videos = sample_ode(engine, repeated, params.eval.num_steps, params.eval.guidance, params.eval.seed)
    return scored(reward_from_params(params), videos, repeated)


def scored(reward, videos, prompts: list[str]) -> dict[str, float]:
    """The mean toy reward of `videos` and of each of its components."""
    output = reward(videos, prompts)
    return {"reward": float(output.scores.mean()),
            **{c: float(output.info[f"toy_following/{c}"].mean()) for c in COMPONENTS}}


def train_variant(variant: str, seed: int, base: str, budget: int, evals: int, eval_samples: int,
                  extra: dict | None = None, tuned: dict | None = None) -> dict:
    """One variant, one seed: train to the compute budget, evaluating at `evals` equal fractions;
    `extra`: params overrides for every variant (--quick's faster EMA), `tuned`: this variant's
    settings (bench/alignment/tune.py), applied last."""
    from flash_grpo_core.tasks import toy
    from flash_grpo_core.config import load_params
    from flash_grpo_core.engine.iteration import build_engine, iteration_prompts, reward_from_params, run_iteration

    params = load_params(ROOT / "params.yaml", preset="toy",
                         overrides={**(extra or {}), **VARIANTS[variant], **(tuned or {}), "seed": seed,
                                    "model.path": base, "model.device": "cpu"})
    engine = build_engine(params)
    reward = reward_from_params(params)
    train_prompts, held_out = toy.toy_prompts(params.toy)
    spent, iteration, began = 0, 0, time.perf_counter()
    thresholds = [budget * (i + 1) / evals for i in range(evals)]
    eval_rows = [{"compute": 0, "wall_s": 0.0, **evaluate(engine, held_out, eval_samples)}]
    train_rows = []
    while spent < budget:
        prompts = iteration_prompts(train_prompts, params.rollout.prompts_per_iteration, iteration, seed)
        metrics = run_iteration(engine, prompts, reward, iteration)
        spent += compute_units(metrics)
        iteration += 1
        train_rows.append({"iteration": iteration, "compute": spent, "train_reward": metrics["reward_mean"],
                           "clip_fraction": metrics["clip_fraction"], "grad_norm": metrics["grad_norm"]})
        while thresholds and spent >= thresholds[0]:
            thresholds.pop(0)
            eval_rows.append({"compute": spent, "wall_s": time.perf_counter() - began,
                              **evaluate(engine, held_out, eval_samples)})
    return {"variant": variant, "seed": seed, "tuned": dict(tuned or {}), "iterations": iteration, "evals": eval_rows,
            "train": train_rows, "wall_s": time.perf_counter() - began}


def gradient_spread(base: str, seed: int = 0, overrides: dict | None = None) -> dict:
    """Policy-gradient norm at each candidate step k of the base model, raw and as each rectification
    mode weights it (the weight is a per-item factor, so the weighted norm is raw x weight), under the
    run's `overrides` (its grid and group size)."""
    import torch

    from flash_grpo_core.tasks import toy
    from flash_grpo_core.config import load_params
    from flash_grpo_core.engine.iteration import build_engine, encode, generate
    from flash_grpo_core.engine.trainer import StepContext, score_items
    from flash_grpo_core.method.batch import PassCounter
    from flash_grpo_core.method.loss import ppo_clip_loss
    from flash_grpo_core.method.rectify import rectification_factors

    params = load_params(ROOT / "params.yaml", preset="toy",
                         overrides={**(overrides or {}), "seed": seed, "model.path": base, "model.device": "cpu"})
    engine = build_engine(params)
    r = params.rollout
    prompts = toy.toy_prompts(params.toy)[0][: r.prompts_per_iteration]
    advantages = torch.tensor([1.0, -1.0] * (len(prompts) * r.group_size // 2))  # fixed signal, zero group mean
    raw = []
    for k in range(r.num_candidates):
        steps = torch.full((len(prompts), r.group_size, 1), k, dtype=torch.long)
        batch, _ = generate(engine, prompts, 0, PassCounter(), train_steps=steps)
        cond, uncond = encode(engine, prompts)
        ctx = StepContext(batch, advantages, cond, uncond, engine.sigmas, engine.scales.float(), r.guidance)
        step, old = score_items(engine.policy, ctx, torch.arange(batch.num_samples), PassCounter())
        loss = ppo_clip_loss(step.log_prob, old, advantages, torch.ones_like(advantages), params.train.clip_range)
        grads = torch.autograd.grad(loss, list(engine.policy.parameters.values()))
        raw.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
    result = {"steps": list(range(r.num_candidates)), "sigmas": engine.sigmas[: r.num_candidates].tolist(),
              "samples": len(prompts) * r.group_size}
    for mode in ("none", "exact", "flow_grpo"):
        factors = rectification_factors(engine.sigmas, mode, r.noise, r.noise_level)[: r.num_candidates]
        if mode == "exact":
            factors = factors / factors.mean()
        norms = [n * float(f) for n, f in zip(raw, factors)]
        result[mode] = {"norms": norms, "max_over_min": max(norms) / min(norms)}
    return result


def _one_thread() -> None:
    """A --jobs worker computes on one thread (set before it imports torch)."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"


def run_all(pairs: list[tuple], base: str, config: dict) -> list[dict]:
    """train_variant for every (variant, seed) or (variant, seed, tuned settings), `config["jobs"]` at a
    time; results in `pairs` order. Without tuned settings in a pair, `config["settings"]` has them."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    def report(run: dict) -> dict:
        print(f"{run['variant']} seed {run['seed']}: {run['iterations']} iterations, held-out reward "
              f"{run['evals'][0]['reward']:.3f} -> {run['evals'][-1]['reward']:.3f} ({run['wall_s']:.0f} s)",
              flush=True)
        return run

    args = (base, config["budget"], config["evals"], config["eval_samples"], config["overrides"])
    settings = config.get("settings") or {}
    calls = [(pair[0], pair[1], *args, pair[2] if len(pair) > 2 else settings.get(pair[0], {})) for pair in pairs]
    if config["jobs"] == 1:
        return [report(train_variant(*call)) for call in calls]
    with ProcessPoolExecutor(config["jobs"], mp_context=get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(train_variant, *call) for call in calls]
        return [report(future.result()) for future in futures]


SHIPPED_BASE = ROOT / "bench" / "toy" / "base"


def shipped_base() -> str:
    """bench/toy/base/ (the frozen `pretrain` stage's output, in git), if it fits params.yaml's toy."""
    import dataclasses

    from flash_grpo_core.config import ToyConfig, load_params

    record = json.loads((SHIPPED_BASE / "pretrain.json").read_text())
    toy = json.loads(json.dumps(dataclasses.asdict(load_params(ROOT / "params.yaml", preset="toy").toy)))
    # a setting added after the base was pre-trained counts at its default, which keeps the task as it was
    trained = {**json.loads(json.dumps(dataclasses.asdict(ToyConfig()))), **record.get("toy", {})}
    if toy != trained:
        changed = sorted(k for k in toy if toy[k] != trained.get(k))
        sys.exit(f"bench/toy/base/ was pre-trained with other toy settings ({', '.join(changed)} differ from "
                 f"params.yaml): pass --pretrain-steps N for a base of your own, or pre-train the shipped one "
                 f"again (see bench/toy/dvc.yaml)")
    return str(SHIPPED_BASE)


def pretrained_base(out: Path, steps: int | None) -> str:
    """The base model directory: the shipped base, or with `steps` a base of its own pre-trained
    for that many steps (under `out`, reused when there)."""
    from flash_grpo_core.pipeline.workspace import tool_env

    if steps is None:
        return shipped_base()
    base = out / f"base-{steps}"
    if not (base / "transformer.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "stages.pretrain", "--out", str(base), "--steps", str(steps)],
                       cwd=ROOT, env=tool_env(), check=True)
    return str(base)


def _overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs as params overrides (values parsed as YAML: 0.95, true, [1, 2])."""
    from ruamel.yaml import YAML

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--set takes KEY=VALUE, got {pair!r}")
        overrides[key] = YAML(typ="safe").load(value)
    return overrides


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first..first+seeds-1 (settings are tuned on seeds the record does not report)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=None, help="the budget, in flash iterations")
    parser.add_argument("--evals", type=int, default=None, help="held-out evaluations per run")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples per held-out prompt")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pre-train a base of this many steps instead of using bench/toy/base/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key (dotted, YAML value) for every variant, e.g. "
                             "--set train.ema_decay=0.95; repeatable")
    parser.add_argument("--settings", default=None,
                        help="settings.json of bench/alignment/tune.py: each variant's tuned settings")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process on one thread")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    quick = args.quick
    out = Path(args.out or ROOT / "bench" / "results" / ("alignment-quick" if quick else "alignment"))
    seeds = args.seeds or (1 if quick else 3)
    variants = args.variants or (["flash", "full"] if quick else list(DEFAULT_VARIANTS))
    flash_iterations = args.iterations or (6 if quick else 40)
    settings = json.loads(Path(args.settings).read_text())["chosen"] if args.settings else {}
    config = {"quick": quick, "seeds": seeds, "first_seed": args.first_seed, "variants": variants, "settings": settings,
              "budget": flash_iterations * flash_iteration_cost(),
              "evals": args.evals or (2 if quick else 8), "eval_samples": args.eval_samples or 8, "jobs": args.jobs,
              # 6 iterations are 12 optimizer steps: an EMA over ~50 steps would still be mostly the base
              "overrides": {**({"train.ema_decay": 0.9} if quick else {}), **_overrides(parser, args.set)}}
    base = pretrained_base(out, args.pretrain_steps)
    runs = run_all([(variant, seed) for variant in variants for seed in range(args.first_seed, args.first_seed + seeds)],
                   base, config)
    # the quick run's smoke size: groups of 4 (a third of the time)
    spread = gradient_spread(base, overrides={**config["overrides"], **({"rollout.group_size": 4} if quick else {})})
    print(write_outputs(out, runs, summarise(runs), spread, config))


if __name__ == "__main__":
    main()
