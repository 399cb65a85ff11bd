"""The alignment benchmark's summary and outputs: per variant the held-out curve over seeds, its
paired difference to flash seed by seed, and the files (runs.csv, evals.csv, summary.json,
alignment.png, alignment.md) that bench/alignment/alignment.py writes."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from bench.results_io import json_text, shown, write_text

REFERENCE = "flash"  # the variant every other one is compared with, seed by seed
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
COMPONENTS = ("color", "single", "motion")


def summarise(runs: list[dict]) -> dict:
    """Per variant: held-out reward at each eval point (mean, std over seeds), final components,
    clip fraction, and hacking flags (a component falling by > 0.02 while the total rises)."""
    summary = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        mine = [run for run in runs if run["variant"] == variant]
        points = min(len(run["evals"]) for run in mine)
        curve = []
        for i in range(points):
            values = [run["evals"][i]["reward"] for run in mine]
            curve.append({"compute": statistics.mean(run["evals"][i]["compute"] for run in mine),
                          "wall_s": statistics.mean(run["evals"][i]["wall_s"] for run in mine),
                          "mean": statistics.mean(values), "std": statistics.pstdev(values)})
        delta = {key: statistics.mean(run["evals"][-1][key] - run["evals"][0][key] for run in mine)
                 for key in ("reward", *COMPONENTS)}
        finals = [run["evals"][-1]["reward"] for run in mine]
        above = sum(run["evals"][-1]["reward"] > run["evals"][0]["reward"] for run in mine)
        summary[variant] = {
            "seeds": len(mine), "seed_list": [run["seed"] for run in mine],
            "iterations": statistics.mean(run["iterations"] for run in mine),
            "wall_s": statistics.mean(run["wall_s"] for run in mine), "curve": curve,
            "base_reward": curve[0]["mean"], "final_reward": statistics.mean(finals),
            "final_reward_std": statistics.pstdev(finals), "delta": delta, "seeds_above_base": above,
            "clip_fraction": statistics.mean(row["clip_fraction"] for run in mine for row in run["train"]),
            "hacking": [c for c in COMPONENTS if delta["reward"] > 0 and delta[c] < -0.02],
            "versus_reference": paired_to_reference(mine, [run for run in runs if run["variant"] == REFERENCE]),
        }
    return summary


def paired_to_reference(mine: list[dict], reference: list[dict]) -> list[dict] | None:
    """At each evaluation point (equal compute), the held-out reward minus the reference variant's
    on the same seed: mean, 95% t-interval over the seeds both ran (none with fewer than 2), and the
    seeds where this variant is ahead. None for the reference itself or without it."""
    by_seed = {run["seed"]: run for run in reference}
    pairs = [(run, by_seed[run["seed"]]) for run in mine if run["seed"] in by_seed and run is not by_seed[run["seed"]]]
    if not pairs:
        return None
    points = []
    for i in range(min(min(len(a["evals"]), len(b["evals"])) for a, b in pairs)):
        differences = [a["evals"][i]["reward"] - b["evals"][i]["reward"] for a, b in pairs]
        mean, n = statistics.mean(differences), len(differences)
        half = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(differences) / n ** 0.5 if n > 1 else None
        points.append({"compute": statistics.mean(a["evals"][i]["compute"] for a, _ in pairs), "mean": mean,
                       "low": None if half is None else mean - half, "high": None if half is None else mean + half,
                       "ahead": sum(d > 0 for d in differences), "seeds": n})
    return points


def write_outputs(out: Path, runs: list[dict], summary: dict, spread: dict, config: dict) -> str:
    """runs.csv (training), evals.csv (held-out), summary.json, alignment.png, alignment.md."""
    evals, train = io.StringIO(newline=""), io.StringIO(newline="")
    writer = csv.writer(evals)
    writer.writerow(["variant", "seed", "compute", "wall_s", "reward", *COMPONENTS])
    for run in runs:
        for row in run["evals"]:
            writer.writerow([run["variant"], run["seed"], row["compute"], round(row["wall_s"], 2),
                             *(round(row[k], 5) for k in ("reward", *COMPONENTS))])
    writer = csv.writer(train)
    writer.writerow(["variant", "seed", "iteration", "compute", "train_reward", "clip_fraction", "grad_norm"])
    for run in runs:
        for row in run["train"]:
            writer.writerow([run["variant"], run["seed"], *(row[k] for k in ("iteration", "compute")),
                             *(round(row[k], 6) for k in ("train_reward", "clip_fraction", "grad_norm"))])
    write_text(out / "evals.csv", evals.getvalue())
    write_text(out / "runs.csv", train.getvalue())
    write_text(out / "summary.json", json_text({"config": config, "variants": summary, "gradient_spread": spread}))
    _plot(out / "alignment.png", summary)
    table = _markdown(summary, spread, config)
    write_text(out / "alignment.md", table)
    print(f"wrote runs.csv, evals.csv, summary.json, alignment.png and alignment.md to {shown(out)}", flush=True)
    return table


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120, sharey=True)
    for axis, key, scale, label in ((axes[0], "compute", 1000, "compute (thousand transformer forward-pass equivalents)"),
                                    (axes[1], "wall_s", 60, "wall time of a run (minutes)")):
        for variant, data in summary.items():
            xs = [p.get(key, 0.0) / scale for p in data["curve"]]
            means, stds = [p["mean"] for p in data["curve"]], [p["std"] for p in data["curve"]]
            axis.plot(xs, means, marker="o", markersize=3, label=variant)
            axis.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              alpha=0.15)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out reward (toy_following)")
    axes[0].set_title("Alignment at equal compute (mean and spread over seeds)")
    axes[1].set_title("... against wall time")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _markdown(summary: dict, spread: dict, config: dict) -> str:
    lines = [f"# Alignment benchmark ({'quick' if config['quick'] else 'full'} run)", "",
             f"Budget {config['budget']} forward-pass equivalents per run, {config['seeds']} seed(s), "
             f"held-out reward on {config['eval_samples']} samples per held-out prompt"
             + (f"; overrides: {config['overrides']}" if config.get("overrides") else "")
             + (f"; {config['jobs']} runs at a time, one thread each (wall s per run)."
                if config.get("jobs", 1) > 1 else "."), "",
             "| variant | iterations | base | final (mean ± std) | Δ reward | seeds > base | Δ color | Δ single | Δ motion | clip frac | wall s | hacking |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for variant, d in summary.items():
        lines.append(f"| {variant} | {d['iterations']:.0f} | {d['base_reward']:.3f} | {d['final_reward']:.3f} ± "
                     f"{d['final_reward_std']:.3f} | {d['delta']['reward']:+.3f} | {d['seeds_above_base']}/{d['seeds']} | "
                     f"{d['delta']['color']:+.3f} | "
                     f"{d['delta']['single']:+.3f} | {d['delta']['motion']:+.3f} | {d['clip_fraction']:.3f} | "
                     f"{d['wall_s']:.0f} | {', '.join(d['hacking']) or '-'} |")
    compared = {variant: d["versus_reference"][-1] for variant, d in summary.items() if d.get("versus_reference")}
    if compared:
        lines += ["", f"Paired with {REFERENCE} seed by seed, at the final point (held-out reward minus {REFERENCE}'s; "
                      "95% t-interval over the seeds; summary.json has every point):", "",
                  f"| variant | minus {REFERENCE} | 95% interval | seeds ahead |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {variant} | {p['mean']:+.4f} | "
                  + (f"{p['low']:+.4f} to {p['high']:+.4f}" if p["low"] is not None else "-")
                  + f" | {p['ahead']}/{p['seeds']} |" for variant, p in compared.items()]
    lines += ["", "Gradient-norm spread across the K candidate timesteps (max / min of the policy-gradient norm",
              f"at each timestep on the base model, {spread['samples']} samples a timestep):", "",
              "| rectification | max / min |", "| --- | ---: |"]
    lines += [f"| {mode} | {spread[mode]['max_over_min']:.2f} |" for mode in ("none", "flow_grpo", "exact")]
    return "\n".join(lines) + "\n"
