"""Choose each variant's settings with the same search, on seeds the record does not report.

    python -m bench.alignment.tune                 # every default variant, tuning seeds 100-102
    python -m bench.alignment.tune --variants flash nft --jobs 2
    python -m bench.alignment --first-seed 0 --seeds 5 --settings bench/results/alignment-tuning/settings.json

The search is coordinate-wise and the same for every variant: starting from the variant's settings
(params.yaml's toy preset with the variant's overrides), each knob of SEARCH in turn takes each of
its values, the others held at the best found so far, and keeps the value with the highest mean
held-out reward at the budget's end over the tuning seeds (ties: the earlier value). A knob that
does not apply to a variant (the SDE noise level and a group's shared initial noise for the
ODE-rollout modes: without an SDE step the first changes nothing and the second would give a group
identical videos) is skipped for it;
each variant also searches its own knobs (OWN). Every finished run is kept in `<out>/runs/` and
reused, so an interrupted search resumes where it stopped, and a search that spans several sittings
costs no run twice. Writes `<out>/settings.json` (the chosen settings, every configuration's score)
and `<out>/tuning.md`. The record then runs on other seeds with those settings, unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

from bench.alignment.alignment import (
    DEFAULT_VARIANTS,
    ROOT,
    VARIANTS,
    flash_iteration_cost,
    run_all,
    shipped_base,
)
from bench.results_io import json_text, write_text

# The shared search, in the order the knobs are tuned.
SEARCH = {
    "train.learning_rate": [5.0e-5, 1.0e-4, 2.0e-4],
    "train.ema_decay": [0.9, 0.98],
    "rollout.same_initial_noise": [False, True],
    "rollout.noise_level": [0.5, 1.0],
}
# Each variant's own knobs, searched after the shared ones.
OWN = {
    "window": {"train.window_every": [2, 4, 8]},
    "window-k": {"train.window_size": [1, 2, 3]},
    "full": {"train.timestep_fraction": [0.5, 0.99]},
    "nft": {"train.nft_beta": [0.1, 1.0]},
    "awm": {"train.clip_range": [1.0e-3, 1.0e-2]},
}
ODE_ROLLOUTS = {"nft", "awm"}  # no SDE step: the noise level changes nothing, a shared initial noise is refused
ODE_SKIPS = ("rollout.noise_level", "rollout.same_initial_noise")
SEEDS = (100, 101, 102)


def knobs(variant: str) -> dict[str, list]:
    """The knobs a variant searches, in order."""
    shared = {key: values for key, values in SEARCH.items() if not (variant in ODE_ROLLOUTS and key in ODE_SKIPS)}
    return {**shared, **OWN.get(variant, {})}


def run_key(variant: str, settings: dict, seed: int, budget: int) -> str:
    """A finished run's file name in `<out>/runs/`: its variant, settings, seed and budget."""
    digest = hashlib.sha256(json.dumps([settings, budget], sort_keys=True).encode()).hexdigest()[:12]
    return f"{variant}-{digest}-s{seed}"


def score(runs: list[dict]) -> float:
    """Mean held-out reward at the budget's end over the seeds."""
    return statistics.mean(run["evals"][-1]["reward"] for run in runs)


def search(variant: str, seeds, evaluate) -> tuple[dict, list[dict]]:
    """Coordinate search for one variant; `evaluate(settings)` runs it on `seeds` and returns the
    runs. Returns the chosen settings and every configuration tried with its score."""
    chosen, tried = {}, {}
    for key, values in knobs(variant).items():
        best = None
        for value in values:
            candidate = {**chosen, key: value}
            name = json.dumps(candidate, sort_keys=True)
            if name not in tried:
                tried[name] = {"settings": candidate, "score": score(evaluate(candidate)), "seeds": list(seeds)}
            if best is None or tried[name]["score"] > best["score"]:
                best = tried[name]
        chosen = dict(best["settings"])
    return chosen, list(tried.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="the tuning seeds")
    parser.add_argument("--iterations", type=int, default=40, help="the budget, in flash iterations (the record's)")
    parser.add_argument("--evals", type=int, default=2, help="held-out evaluations per run (the last one scores)")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "alignment-tuning"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    budget = args.iterations * flash_iteration_cost()
    config = {"budget": budget, "evals": args.evals, "eval_samples": args.eval_samples, "jobs": args.jobs,
              "overrides": {}}
    base = shipped_base()

    def evaluate_for(variant):
        def evaluate(settings: dict) -> list[dict]:
            paths = {seed: out / "runs" / f"{run_key(variant, settings, seed, budget)}.json" for seed in args.seeds}
            missing = [seed for seed, path in paths.items() if not path.is_file()]
            for run in run_all([(variant, seed, settings) for seed in missing], base, config):
                write_text(paths[run["seed"]], json_text(run))
            return [json.loads(path.read_text()) for path in paths.values()]
        return evaluate

    results = {variant: search(variant, args.seeds, evaluate_for(variant)) for variant in args.variants}
    record = {"seeds": args.seeds, "budget": budget, "iterations": args.iterations, "search": SEARCH, "own": OWN,
              "chosen": {variant: chosen for variant, (chosen, _) in results.items()},
              "tried": {variant: tried for variant, (_, tried) in results.items()}}
    write_text(out / "settings.json", json_text(record))
    write_text(out / "tuning.md", _markdown(record))
    print(f"wrote {out / 'settings.json'}")


def _markdown(record: dict) -> str:
    lines = ["# Alignment benchmark: the settings search", "",
             f"Coordinate search on tuning seeds {record['seeds']} (never reported), budget {record['budget']} "
             f"forward-pass equivalents ({record['iterations']} flash iterations); score: the mean held-out "
             "reward at the budget's end.", "", "| variant | chosen | score |", "| --- | --- | ---: |"]
    for variant, chosen in record["chosen"].items():
        best = max(record["tried"][variant], key=lambda entry: entry["score"])
        lines.append(f"| {variant} | {json.dumps(chosen, sort_keys=True)} | {best['score']:.4f} |")
    lines += ["", "Every configuration tried:", "", "| variant | settings | score |", "| --- | --- | ---: |"]
    for variant, tried in record["tried"].items():
        lines += [f"| {variant} | {json.dumps(entry['settings'], sort_keys=True)} | {entry['score']:.4f} |"
                  for entry in tried]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
