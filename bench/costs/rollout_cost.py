"""Cost and accuracy of the cheaper flash rollouts (rollout.head_steps, tail_steps, guidance_until).

    python -m bench.costs.rollout_cost                                     # toy, tiny and toy-n20, CPU
    python -m bench.costs.rollout_cost --heldout-only --alignment bench/results/alignment/summary.json \
        bench/results/alignment-fast/summary.json bench/results/alignment-n20/summary.json  # + held-out rewards

For every option set (OPTION_SETS; `flash`, Euler on the training grid with guidance everywhere, is
the reference) on the toy preset (the shipped base bench/toy/base), on the toy at the Wan presets'
grid (`toy-n20`: N = 20, K = 10) and on the tiny one (random weights), every candidate step k gets
the same number of prompts (G samples each), so per-video figures are averages over a uniform k, as
in training. Measured:

- transformer forwards per video (PassCounter: a guided call counts 2) and the reduction
  (the reference's forwards / the option's);
- wall time of the sampling (no decoding) per video: the median of `--repeats` rounds, each round
  timing every option set one after the other, and the median of the per-round ratio to the reference;
- the final video's error from the same x_{k+1}: mean abs pixel difference, in [0, 255], between the
  option's decoded video and the Euler tail's (guided, training grid) from the option's own x_{k+1}:
  what the cheaper tail changes in what the reward sees; and against a fine solve of the tail
  (UniPC, `FINE_STEPS` steps, guided), for the option and for the Euler tail, which shows how far
  Euler itself is from the ODE;
- the head's change of x_k: mean |x_k - x_k(Euler)| / mean |x_k(Euler)| on the same noise;
- toy only: the toy reward's mean change from the Euler tail's on the same x_{k+1} and from the
  reference rollout's (same noise), and the correlation of the group-centred rewards (GRPO's
  advantages up to the batch std) with the Euler tail's and the fine solve's: whether the cheaper
  rollout ranks a group's samples as the reference would.

The held-out rewards come from the alignment benchmark at equal compute (bench/alignment/alignment.py;
`--alignment`: its summary.json files, each filed under the toy preset of its grid):
`heldout_reward(_std)` of the variant that runs the option set (ALIGNMENT_VARIANTS) and
`flash_heldout_reward(_std)` of its `flash` variant, the toy grid's at the top level and toy-n20's
under `presets`; null for the option sets it does not run (`--heldout-only` fills them into an
earlier measurement). Writes bench/results/rollout_cost.json (a list, one entry per option set;
the top-level forwards and reduction are the toy preset's, every figure per preset under
`presets`) and rollout_cost.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import RESULTS, write_results  # importable once the project root is on the path

OPTION_SETS = {  # rollout.* keys; `flash` (all off) is the reference
    "flash": {},
    "tail2": {"tail_steps": 2},
    "tail3": {"tail_steps": 3},
    "tail5": {"tail_steps": 5},
    "head1": {"head_steps": 1},
    "head2": {"head_steps": 2},
    "head1-tail2": {"head_steps": 1, "tail_steps": 2},
    "head1-tail3": {"head_steps": 1, "tail_steps": 3},
    "head2-tail3": {"head_steps": 2, "tail_steps": 3},
    "guide0.5": {"guidance_until": 0.5},
    "head1-tail3-guide0.5": {"head_steps": 1, "tail_steps": 3, "guidance_until": 0.5},
}
# The option sets bench/alignment/alignment.py trains (its VARIANTS), for the held-out rewards.
ALIGNMENT_VARIANTS = {"flash": "flash", "head1-tail2": "flash-fast", "head1-tail3": "flash-fast3",
                      "head1-tail3-guide0.5": "flash-fast-guide"}
FINE_STEPS = 50
TOY = {"model.path": "bench/toy/base", "model.device": "cpu"}
# name: (params.yaml preset, overrides). toy-n20: the toy on the Wan presets' grid (N = 20, K = 10)
PRESETS = {"toy": ("toy", TOY), "tiny": ("tiny", {"model.device": "cpu"}),
           "toy-n20": ("toy", {**TOY, "rollout.num_steps": 20, "rollout.num_candidates": 10})}


def build(preset: str):
    """The preset's engine (options off), its prompts (K of them) and their steps [K, G, 1]: prompt k trains k."""
    import torch

    from flash_grpo_core.tasks import toy
    from flash_grpo_core.config import load_params
    from flash_grpo_core.engine.iteration import build_engine, encode

    params = load_params(ROOT / "params.yaml", preset=PRESETS[preset][0], overrides=PRESETS[preset][1])
    engine = build_engine(params)
    r = params.rollout
    prompts = (toy.toy_prompts(params.toy)[0] if params.preset == "toy" else
               [f"a test prompt number {i}" for i in range(r.num_candidates)])[: r.num_candidates]
    steps = torch.arange(r.num_candidates).view(-1, 1, 1).expand(-1, r.group_size, 1).clone()
    return engine, prompts, steps, encode(engine, prompts)


def with_options(params, options: dict):
    """`params` with the option set's `rollout.*` keys (validated as params.yaml's)."""
    return dataclasses.replace(params, rollout=dataclasses.replace(params.rollout, **options))


def sample_all(engine, prompts, steps, embeds, repeats: int) -> dict:
    """Each option set's rollouts, forwards, and sampling seconds of every round (rounds interleaved)."""
    from flash_grpo_core.engine.iteration import sample_rollouts
    from flash_grpo_core.method.batch import PassCounter

    base, runs = engine.params, {name: {"seconds": []} for name in OPTION_SETS}
    for _ in range(repeats):
        for name, options in OPTION_SETS.items():
            engine.params, counter = with_options(base, options), PassCounter()
            began = time.perf_counter()
            batch = sample_rollouts(engine, prompts, 0, counter, train_steps=steps, embeds=embeds)
            runs[name]["seconds"].append(time.perf_counter() - began)
            runs[name].update(batch=batch, forwards=counter.forward)
    engine.params = base
    return runs


def tail_from(engine, batch, embeds, fine: bool):
    """Final latents from each sample's recorded x_{k+1}: Euler on the grid, or UniPC with FINE_STEPS."""
    import torch

    from flash_grpo_core.engine.fast_rollout import FastRolloutOptions, RolloutSolver, segment_sigmas
    from flash_grpo_core.engine.iteration import sampling_spec
    from flash_grpo_core.method.schedule import interval_sigmas

    r, sigmas = engine.params.rollout, engine.sigmas
    spec = sampling_spec(engine, sigmas, engine.scales, r.guidance, seed=0)  # the tail draws no noise
    solver = RolloutSolver(engine.policy.transformer, embeds[1], spec, FastRolloutOptions(shift=r.shift), None)
    finals = torch.empty_like(batch.final_latents)
    with torch.no_grad():
        for k in sorted(set(batch.steps[:, 0].tolist())):
            rows = (batch.steps[:, 0] == k).nonzero().flatten()
            segment = (interval_sigmas(float(sigmas[k + 1]), 0.0, FINE_STEPS, r.shift) if fine
                       else segment_sigmas(sigmas, k + 1, r.num_steps, None, r.shift))
            x = batch.next_latents[rows, 0].to(engine.device)
            cond = embeds[0][batch.prompt_index[rows]]
            finals[rows] = solver.integrate(x, cond, segment, solver=fine).cpu()
    return finals


def pixel_error(a, b) -> float:
    return float((a.float() - b.float()).abs().mean())


def accuracy(engine, prompts, embeds, runs: dict, reward) -> dict:
    """Per option set: pixel errors from the same x_{k+1}, x_k's change, toy reward changes."""
    import hashlib

    from flash_grpo_core.engine.iteration import decode

    reference = runs["flash"]["batch"]
    texts = [prompts[i] for i in reference.prompt_index.tolist()]
    score = (lambda videos: reward(videos, texts).scores.float()) if reward else None  # [S]
    reference_video = decode(engine, reference.final_latents)
    figures, tails = {}, {}  # tails: the Euler and fine videos per x_{k+1} (option sets with one head share it)
    for name, run in runs.items():
        batch = run["batch"]
        video = decode(engine, batch.final_latents)
        key = hashlib.sha256(batch.next_latents.numpy().tobytes()).hexdigest()
        if key not in tails:
            tails[key] = [decode(engine, tail_from(engine, batch, embeds, fine)) for fine in (False, True)]
        euler, fine = tails[key]
        figures[name] = {
            "tail_pixel_error": pixel_error(video, euler), "tail_pixel_error_vs_fine": pixel_error(video, fine),
            "euler_tail_pixel_error_vs_fine": pixel_error(euler, fine),
            "video_pixel_error_vs_flash": pixel_error(video, reference_video),
            "head_x_k_relative_change": float((batch.latents - reference.latents).abs().mean()
                                              / reference.latents.abs().mean()),
        }
        if score:
            mine, group = score(video), engine.params.rollout.group_size
            euler_r, fine_r = score(euler), score(fine)
            figures[name].update(reward=float(mine.mean()),
                                 reward_change_vs_euler_tail=float(mine.mean() - euler_r.mean()),
                                 reward_change_vs_fine_tail=float(mine.mean() - fine_r.mean()),
                                 reward_change_vs_flash=float(mine.mean() - score(reference_video).mean()),
                                 advantage_corr_vs_euler_tail=advantage_agreement(mine, euler_r, group),
                                 advantage_corr_vs_fine_tail=advantage_agreement(mine, fine_r, group),
                                 euler_advantage_corr_vs_fine_tail=advantage_agreement(euler_r, fine_r, group))
    return figures


def advantage_agreement(rewards, reference, group: int) -> float:
    """Pearson correlation of two rewards [S] of the same samples, centred in each group of G: the
    GRPO advantages up to the batch std. 1: the cheaper tail ranks a group's samples as Euler's does."""
    import torch

    centred = [r.reshape(-1, group) - r.reshape(-1, group).mean(1, keepdim=True) for r in (rewards, reference)]
    return float(torch.corrcoef(torch.stack([c.flatten() for c in centred]))[0, 1])


def measure(preset: str, repeats: int) -> dict:
    """Every figure of every option set on one preset."""
    from flash_grpo_core.engine.iteration import reward_from_params

    engine, prompts, steps, embeds = build(preset)
    videos = steps.numel()
    runs = sample_all(engine, prompts, steps, embeds, repeats)
    reward = reward_from_params(engine.params) if engine.params.preset == "toy" else None
    figures = accuracy(engine, prompts, embeds, runs, reward)
    reference = runs["flash"]
    for name, run in runs.items():
        ratios = [mine / ref for mine, ref in zip(run["seconds"], reference["seconds"])]
        figures[name].update(
            forwards_per_video=run["forwards"] / videos, reduction=reference["forwards"] / run["forwards"],
            wall_s_per_video=statistics.median(run["seconds"]) / videos, wall_ratio=statistics.median(ratios),
            videos=videos, num_steps=engine.params.rollout.num_steps,
            num_candidates=engine.params.rollout.num_candidates)
    return figures


GRID = ("rollout.num_steps", "rollout.num_candidates")


def heldout(summary_paths: list[str]) -> dict:
    """Held-out reward (mean, std over seeds) per toy preset and alignment variant, from summary.json
    files: a file belongs to the toy preset whose grid (GRID) its overrides set, `toy` when they set
    none; a variant in several files of one preset: the first file's."""
    grids = {name: {k: v for k, v in overrides.items() if k in GRID}
             for name, (preset, overrides) in PRESETS.items() if preset == "toy"}
    rewards = {}
    for path in reversed(summary_paths):
        summary = json.loads(Path(path).read_text())
        grid = {k: v for k, v in summary["config"]["overrides"].items() if k in GRID}
        preset = next((name for name, g in grids.items() if g == grid), None)
        if preset is None:
            sys.exit(f"{path}: its grid {grid} is none of the toy presets' here ({grids})")
        rewards.setdefault(preset, {}).update(
            {name: (v["final_reward"], v["final_reward_std"]) for name, v in summary["variants"].items()})
    return rewards


def entries(results: dict, rewards: dict) -> list[dict]:
    """One JSON entry per option set: the toy preset's forwards and reduction (the first preset's
    without toy), every preset's figures, held-out rewards."""
    rows = []
    for name, options in OPTION_SETS.items():
        toy = (results.get("toy") or next(iter(results.values())))[name]
        rows.append({"option": name, "overrides": {f"rollout.{k}": v for k, v in options.items()},
                     "forwards_per_video": toy["forwards_per_video"], "reduction": toy["reduction"],
                     "presets": {preset: results[preset][name] for preset in results}})
    return fill_heldout(rows, rewards)


def fill_heldout(rows: list[dict], rewards: dict) -> list[dict]:
    """Each entry's held-out rewards, its alignment variant's and flash's (None where not run): at the
    top level the `toy` preset's, and each toy preset's under `presets` where measured."""
    def figures(preset: str, option: str) -> dict:
        variant, runs = ALIGNMENT_VARIANTS.get(option), rewards.get(preset, {})
        (mine, mine_std), (flash, flash_std) = runs.get(variant, (None, None)), runs.get("flash", (None, None))
        return {"alignment_variant": variant if variant in runs else None, "heldout_reward": mine,
                "heldout_reward_std": mine_std, "flash_heldout_reward": flash, "flash_heldout_reward_std": flash_std}

    for row in rows:
        row.update(figures("toy", row["option"]))
        for preset in set(row["presets"]) & set(rewards) - {"toy"}:
            row["presets"][preset].update(figures(preset, row["option"]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# Cheaper flash rollouts: cost and accuracy", "",
             ("Per option set (`flash`: Euler on the training grid, guided everywhere, the reference): "
             "transformer forwards per video and the reduction; sampling wall time against the reference "
             "(median of per-round ratios); the final video's mean abs pixel error (0-255) against the Euler "
             "tail from the same x_{k+1}, and against a 50-step UniPC solve of the tail (the Euler tail's in "
             "brackets); x_k's relative change under the head solver; on the toy preset the reward's mean "
             "change from the Euler tail's and from the reference rollout's, and the correlation of the "
             "group-centred rewards (the advantages) with the Euler tail's and with the fine solve's."), ""]
    for preset, setup in rows[0]["presets"].items():
        lines += [(f"## {preset} preset (N = {setup['num_steps']}, K = {setup['num_candidates']}, {setup['videos']} "
                   "videos, every k equally often)"), "",
                  ("| option | forwards / video | reduction | wall ratio | tail px err | vs fine (Euler's) | "
                   "x_k change | reward Δ tail | reward Δ flash | adv. corr | vs fine (Euler's) |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in rows:
            f = row["presets"][preset]
            rewards = (f"{f['reward_change_vs_euler_tail']:+.4f} | {f['reward_change_vs_flash']:+.4f} | "
                       f"{f['advantage_corr_vs_euler_tail']:.3f} | {f['advantage_corr_vs_fine_tail']:.3f} "
                       f"({f['euler_advantage_corr_vs_fine_tail']:.3f})" if "reward" in f else "- | - | - | -")
            lines.append(f"| {row['option']} | {f['forwards_per_video']:.1f} | {f['reduction']:.2f}x | "
                         f"{f['wall_ratio']:.2f} | {f['tail_pixel_error']:.2f} | {f['tail_pixel_error_vs_fine']:.2f} "
                         f"({f['euler_tail_pixel_error_vs_fine']:.2f}) | {f['head_x_k_relative_change']:.4f} | "
                         f"{rewards} |")
        lines.append("")
    for preset in ["toy", *(p for p in rows[0]["presets"] if p != "toy" and "heldout_reward" in rows[0]["presets"][p])]:
        measured = [row if preset == "toy" else row["presets"][preset] for row in rows]
        measured = [(row, f) for row, f in zip(rows, measured) if f["heldout_reward"] is not None]
        if not measured:
            continue
        lines += [f"## Held-out reward at equal compute ({preset}, bench/alignment/alignment.py; "
                  "mean ± std over seeds)", "",
                  "| option | alignment variant | held-out reward | flash's |", "| --- | --- | ---: | ---: |"]
        for row, f in measured:
            lines.append(f"| {row['option']} | {f['alignment_variant']} | {f['heldout_reward']:.4f} ± "
                         f"{f['heldout_reward_std']:.4f} | {f['flash_heldout_reward']:.4f} ± "
                         f"{f['flash_heldout_reward_std']:.4f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.costs.rollout_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (median)")
    parser.add_argument("--alignment", nargs="*", default=[],
                        help="bench/alignment/alignment.py's summary.json file(s), for the held-out rewards")
    parser.add_argument("--heldout-only", action="store_true",
                        help="measure nothing: fill the held-out rewards of --alignment into --out's rollout_cost.json")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.heldout_only:
        rows = fill_heldout(json.loads((out / "rollout_cost.json").read_text()), heldout(args.alignment))
    else:
        results = {}
        for preset in args.presets:
            results[preset] = measure(preset, args.repeats)
            print(f"{preset}: " + json.dumps({name: {k: round(v, 4) for k, v in f.items()}
                                               for name, f in results[preset].items()}), flush=True)
        rows = entries(results, heldout(args.alignment))
    table = markdown(rows)
    write_results("rollout_cost", rows, table, out)
    print(table)


if __name__ == "__main__":
    main()
