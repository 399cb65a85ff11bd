"""Cost of one training iteration per mode (flash, window, full) at the same N, G and batch.

    python -m bench.costs.iteration_cost                                                   # tiny preset, CPU
    python -m bench.costs.iteration_cost --arch wan1_3b --height 240 --width 416 --frames 17   # GPU
    python -m bench.costs.iteration_cost --modes flash --head-steps 2 --tail-steps 3 \\
        --tag tiny-cpu-fast                                                                # cheaper rollouts

For each mode, in a fresh subprocess (so peak memory is the mode's own): one warm-up iteration,
then `--repeats` timed ones. Reports the median wall time (rollout and update apart), transformer
forward and backward passes (sample units; a guided call on S latents is 2S), peak memory (CUDA
allocator peak on GPU, peak RSS on CPU), and full/flash and window/flash ratios. `--arch wan1_3b`
or `wan14b` uses Wan 2.1's real transformer and VAE architectures with random weights (no
weights needed). Writes JSON and a markdown table under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.results_io import RESULTS, write_results

ROOT = Path(__file__).resolve().parents[2]
MODULE = "bench.costs.iteration_cost"  # each mode runs as `python -m MODULE` from ROOT
MODES = ("flash", "window", "full")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and clip shape options shared with bench/costs/gpu_step.py."""
    parser.add_argument("--arch", default="tiny", choices=["tiny", "wan1_3b", "wan14b"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.costs.iteration_cost", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, default=2, help="B prompts per iteration")
    parser.add_argument("--group", type=int, default=4, help="G samples per prompt")
    parser.add_argument("--steps", type=int, default=20, help="N sampling steps")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tag", default=None, help="suffix of the output files (default: arch and device)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    for key in ("head-steps", "tail-steps"):  # cheaper flash rollouts (engine/fast_rollout.py), flash mode only
        parser.add_argument(f"--{key}", type=int, default=None, help=f"flash mode: rollout.{key.replace('-', '_')}")
    parser.add_argument("--guidance-until", type=float, default=None, help="flash mode: rollout.guidance_until")
    parser.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def bench_params(args, mode):
    from flash_grpo_core.config import load_params

    overrides = {"train.mode": mode, "rollout.num_steps": args.steps, "rollout.num_candidates": max(1, args.steps // 2),
                 "rollout.prompts_per_iteration": args.prompts,
                 "rollout.group_size": args.group, "rollout.batch_size": args.prompts * args.group,
                 "train.micro_batch": args.micro_batch, "train.minibatches": 1, "train.skip_zero_advantage": False,
                 "model.device": args.device, "model.gradient_checkpointing": args.arch != "tiny"}
    cheaper = ("head_steps", "tail_steps", "guidance_until") if mode == "flash" else ()
    for key in ("height", "width", "frames", *cheaper):
        if getattr(args, key) is not None:
            overrides[f"rollout.{key}"] = getattr(args, key)
    return load_params(ROOT / "params.yaml", preset="tiny", overrides=overrides)


def bench_engine(args, params):
    from flash_grpo_core.engine import iteration
    from flash_grpo_core.models import random_stacks

    if args.arch == "tiny":
        return iteration.build_engine(params)
    device = iteration.resolve_device(params.model.device)
    dtype = iteration.resolve_dtype(params.model.dtype, device)
    stack = random_stacks.build_random_stack(args.arch, seed=params.seed, dtype=dtype, text_len=64, device="cpu",
                                             num_layers=getattr(args, "layers", None))
    reference = iteration.make_trainable(stack.transformer, params)
    for module in (stack.transformer, stack.text_encoder, stack.vae):
        module.to(device)
    return iteration.Engine(params, stack, iteration.build_policy(stack.transformer, params, reference), device)


def measure_mode(args, mode) -> dict:
    """Run in a subprocess: warm-up plus timed iterations of one mode."""
    import resource

    import torch

    from flash_grpo_core.engine import iteration
    from flash_grpo_core.method.batch import PassCounter
    from flash_grpo_core.rewards import build_weighted_reward

    params = bench_params(args, mode)
    engine = bench_engine(args, params)
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reward = build_weighted_reward({"brightness": 1.0})
    prompts = [f"a red square moving left, take {i}" for i in range(args.prompts)]
    rows = []
    for it in range(args.repeats + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rollout_counter, train_counter = PassCounter(), PassCounter()
        sync(); began = time.perf_counter()
        batch, videos = iteration.generate(engine, prompts, it, rollout_counter)
        rewards, _ = iteration.score(reward, videos, prompts, batch)
        sync(); rolled = time.perf_counter()
        iteration.update(engine, prompts, batch, iteration.advantages_for(params, rewards), it, train_counter)
        sync(); done = time.perf_counter()
        rows.append({"rollout_s": rolled - began, "update_s": done - rolled, "total_s": done - began,
                     "rollout_forward": rollout_counter.forward, "train_forward": train_counter.forward,
                     "train_backward": train_counter.backward,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
    timed = rows[1:]  # the first iteration warms up kernels and allocators
    peak = max(r["peak_gib"] for r in timed) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, "trained_steps_per_sample": int(batch.steps.shape[1]),
            **{k: statistics.median(r[k] for r in timed) for k in ("rollout_s", "update_s", "total_s")},
            **{k: timed[-1][k] for k in ("rollout_forward", "train_forward", "train_backward")},
            "peak_memory_gib": round(peak, 3), "peak_memory_kind": "cuda_allocated" if cuda else "process_rss",
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__}


def _table(results: dict) -> str:
    lines = ["| mode | trained steps/sample | rollout s | update s | total s | fwd (rollout) | fwd (train) | bwd (train) | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["modes"]:
        lines.append(f"| {r['mode']} | {r['trained_steps_per_sample']} | {r['rollout_s']:.3f} | {r['update_s']:.3f} | "
                     f"{r['total_s']:.3f} | {r['rollout_forward']} | {r['train_forward']} | {r['train_backward']} | "
                     f"{r['peak_memory_gib']:.2f} |")
    lines += ["", *(f"- {k}: {v:.2f}" for k, v in results["ratios"].items())]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.one_mode:
        print(json.dumps(measure_mode(args, args.one_mode)))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    modes = []
    for mode in args.modes:
        out = subprocess.run([sys.executable, "-m", MODULE, *passthrough, "--one-mode", mode],
                             check=False, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"mode {mode} failed:\n{out.stderr[-4000:]}")
        modes.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {modes[-1]['total_s']:.3f} s per iteration", flush=True)
    by_mode = {m["mode"]: m for m in modes}
    ratios = {}
    if "flash" in by_mode:
        for other in ("full", "window"):
            if other in by_mode:
                ratios[f"{other}/flash wall time"] = by_mode[other]["total_s"] / by_mode["flash"]["total_s"]
                ratios[f"{other}/flash update time"] = by_mode[other]["update_s"] / by_mode["flash"]["update_s"]
                ratios[f"{other}/flash train passes"] = (
                    (by_mode[other]["train_forward"] + by_mode[other]["train_backward"])
                    / (by_mode["flash"]["train_forward"] + by_mode["flash"]["train_backward"]))
    device = modes[0]["device"] if modes else "none"
    # out_dir is where the record went, not how it was measured (and a machine's path)
    config = {k: v for k, v in vars(args).items() if k not in ("one_mode", "out_dir")}
    results = {"arch": args.arch, "device": device, "config": config, "modes": modes, "ratios": ratios}
    on_gpu = bool(modes) and modes[0]["peak_memory_kind"] == "cuda_allocated"
    tag = args.tag or f"{args.arch}-{'cuda' if on_gpu else 'cpu'}"
    table = f"# Iteration cost, {args.arch} on {device}\n\n{_table(results)}\n"
    write_results(f"iteration_cost-{tag}", results, table, args.out_dir)
    print(table)


if __name__ == "__main__":
    main()
