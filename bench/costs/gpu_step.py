"""The pipeline's rollout and update against raw transformer calls on one device, and flash vs full.

    python -m bench.costs.gpu_step                                 # tiny shape, CPU (what the test runs)
    python -m bench.costs.gpu_step --arch wan1_3b --height 480 --width 832 --frames 81   # one GPU
    python -m bench.costs.gpu_step --arch wan14b --height 480 --width 832 --frames 81

On the engine of bench/costs/iteration_cost.py (the tiny model, or Wan 2.1's real transformer and VAE
architectures with random weights and LoRA as configured), for one prompt x G videos at N steps
with classifier-free guidance, after one warm-up and as medians over `--repeats`:

- rollout: `iteration.generate` (the engine's sampler, SDE steps recorded, then the VAE decode)
  per video, with and without the decode, against N raw CFG forwards of one video (the
  transformer called directly on a cond+uncond batch of 2 latents under no_grad, as
  `engine.sampler.predict_velocity` calls it);
- update: `iteration.update` on the flash batch (one trained step per sample) per trained item,
  against one raw forward+backward of the same transformer (same LoRA, same gradient
  checkpointing) on the same CFG pair;
- peak memory of each (CUDA allocator peak on GPU; on CPU the process's peak RSS during it, reset
  through /proc/self/clear_refs);
- one iteration of `flash` against `full` at N steps, measured by bench/costs/iteration_cost.py.

The prompt embeddings are computed once outside the timings (the random stacks' text encoder is a
small stand-in for UMT5-XXL). `--rollout-batch` and `--micro-batch` (default 1: one video's, one
item's CFG pair per transformer call, as the raw measurements and the wan14b preset) set the
pipeline's batching. Targets: rollout and update within 1.10x of raw, full/flash >= 5x
per iteration. Writes bench/results/gpu_step-<arch>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# importable once the project root is on the path
from bench.costs import iteration_cost
from bench.results_io import RESULTS, write_results

PARTS = ("rollout", "update", "iteration")
# ratio name -> (bound, limit): "max" means the ratio should be at most the limit, "min" at least
TARGETS = {"rollout/raw (sampling)": ("max", 1.10), "rollout/raw (with decode)": ("max", 1.10),
           "update/raw": ("max", 1.10), "full/flash iteration": ("min", 5.0)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.costs.gpu_step", description=__doc__.splitlines()[0])
    iteration_cost.add_model_arguments(parser)
    parser.add_argument("--group", type=int, default=4, help="G videos of the one prompt")
    parser.add_argument("--steps", type=int, default=20, help="N sampling steps")
    parser.add_argument("--rollout-batch", type=int, default=1, help="videos per transformer call while sampling")
    parser.add_argument("--micro-batch", type=int, default=1, help="trained items per forward+backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None, help="suffix of the output files (default: arch and device)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def iteration_argv(args) -> list[str]:
    """bench/costs/iteration_cost.py's arguments for the same shape, one prompt x G, N steps."""
    argv = ["--arch", args.arch, "--device", args.device, "--prompts", "1", "--group", str(args.group),
            "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--repeats", str(args.repeats)]
    for key in ("height", "width", "frames"):
        if getattr(args, key) is not None:
            argv += [f"--{key}", str(getattr(args, key))]
    return argv


class Meter:
    """Synchronised wall time and peak memory on one device."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.memory_kind = "cuda_allocated" if self.cuda else "process_rss"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError):  # without it the peak is the process's since its start
            Path("/proc/self/clear_refs").write_text("5")

    def peak_gib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**30
        with contextlib.suppress(OSError):
            return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def timed(self, call, *args, **kwargs):
        """(seconds, result) of `call(*args, **kwargs)`, synchronised before and after."""
        self.sync()
        began = time.perf_counter()
        result = call(*args, **kwargs)
        self.sync()
        return time.perf_counter() - began, result


@contextlib.contextmanager
def timed_decode(meter: Meter, records: list):
    """Time `iteration.decode` inside `generate`: appends (seconds, peak GiB before decoding)."""
    from flash_grpo_core.engine import iteration

    original = iteration.decode

    def decode(engine, latents):
        sampling_peak = meter.peak_gib()
        seconds, videos = meter.timed(original, engine, latents)
        records.append((seconds, sampling_peak))
        return videos

    iteration.decode = decode
    try:
        yield
    finally:
        iteration.decode = original


def raw_inputs(engine, embeds):
    """One video's CFG pair: latents [2, C, F, H, W] in the compute dtype, context [2, L, D], timesteps [N]."""
    import torch

    from flash_grpo_core.engine.sampler import compute_dtype
    from flash_grpo_core.method.schedule import transformer_timesteps

    r, dtype = engine.params.rollout, compute_dtype(engine.policy.transformer)
    cond, uncond = embeds
    latent = torch.randn(1, *engine.stack.latent_shape(r.frames, r.height, r.width),
                         generator=torch.Generator().manual_seed(0))  # [1, C, F, H, W]
    pair = 2 if engine.guided else 1
    context = torch.cat([cond[:1], uncond]) if engine.guided else cond[:1]  # [2 or 1, L, D]
    return (latent.expand(pair, *latent.shape[1:]).to(engine.device, dtype), context.to(engine.device, dtype),
            transformer_timesteps(engine.sigmas[:-1]).to(engine.device))


def raw_rollout(engine, inputs) -> None:
    """N CFG forwards of one video, the transformer called directly, no gradient."""
    import torch

    latents, context, timesteps = inputs
    with torch.no_grad():
        for timestep in timesteps:
            engine.policy.transformer(hidden_states=latents, timestep=timestep.expand(len(latents)),
                                      encoder_hidden_states=context, return_dict=False)


def raw_update(engine, inputs, items: int) -> None:
    """`items` forward+backward calls on one CFG pair, in training mode (gradient checkpointing as set)."""
    latents, context, timesteps = inputs
    transformer = engine.policy.transformer
    transformer.train()
    try:
        for item in range(items):
            timestep = timesteps[item % len(timesteps)].expand(len(latents))
            out = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                              return_dict=False)[0]
            out.float().square().mean().backward()
            for parameter in engine.policy.parameters.values():
                parameter.grad = None
    finally:
        transformer.eval()


def measure_rollout(engine, meter: Meter, prompts, embeds, repeats: int) -> tuple[dict, tuple]:
    """Pipeline rollout per video (with and without decode) and raw N CFG forwards per video."""
    from flash_grpo_core.engine import iteration
    from flash_grpo_core.method.batch import PassCounter

    group, inputs = engine.params.rollout.group_size, raw_inputs(engine, embeds)
    rows, decodes = [], []
    with timed_decode(meter, decodes):
        for repeat in range(repeats + 1):  # the first warms up kernels and allocators
            meter.reset_peak()
            counter = PassCounter()
            seconds, (batch, videos) = meter.timed(iteration.generate, engine, prompts, repeat, counter,
                                                   embeds=embeds)
            peak = meter.peak_gib()
            meter.reset_peak()
            raw_seconds, _ = meter.timed(raw_rollout, engine, inputs)
            decode_seconds, sampling_peak = decodes[-1]
            rows.append({"with_decode": seconds / group, "decode": decode_seconds / group,
                         "raw": raw_seconds, "peak": peak, "sampling_peak": sampling_peak,
                         "raw_peak": meter.peak_gib()})
    timed = rows[1:]
    median = {key: statistics.median(row[key] for row in timed) for key in ("with_decode", "decode", "raw")}
    sampling = statistics.median(row["with_decode"] - row["decode"] for row in timed)
    result = {"pipeline_s_per_video": median["with_decode"], "pipeline_sampling_s_per_video": sampling,
              "decode_s_per_video": median["decode"], "raw_s_per_video": median["raw"],
              "pipeline_forward_passes_per_video": counter.forward / group,
              "raw_forward_passes_per_video": len(inputs[2]) * len(inputs[0]),
              "peak_gib": {"pipeline": max(r["peak"] for r in timed),
                           "pipeline_sampling": max(r["sampling_peak"] for r in timed),
                           "raw": max(r["raw_peak"] for r in timed)}}
    return result, (batch, videos)


def measure_update(engine, meter: Meter, prompts, embeds, rollout, repeats: int) -> dict:
    """Pipeline update per trained item on the flash batch, and raw forward+backward per item."""
    from flash_grpo_core.engine import iteration
    from flash_grpo_core.method.batch import PassCounter
    from flash_grpo_core.rewards import build_weighted_reward

    batch, videos = rollout
    rewards, _ = iteration.score(build_weighted_reward({"brightness": 1.0}), videos, prompts, batch)
    advantages = iteration.advantages_for(engine.params, rewards)
    inputs = raw_inputs(engine, embeds)
    rows = []
    for repeat in range(repeats + 1):
        meter.reset_peak()
        counter = PassCounter()
        seconds, metrics = meter.timed(iteration.update, engine, prompts, batch, advantages, repeat, counter,
                                       embeds=embeds)
        items = int(metrics["trained_items"])
        peak = meter.peak_gib()
        meter.reset_peak()
        raw_seconds, _ = meter.timed(raw_update, engine, inputs, items)
        rows.append({"pipeline": seconds / items, "raw": raw_seconds / items, "peak": peak,
                     "raw_peak": meter.peak_gib()})
    timed = rows[1:]
    return {"pipeline_s_per_item": statistics.median(r["pipeline"] for r in timed),
            "raw_s_per_item": statistics.median(r["raw"] for r in timed), "trained_items": items,
            "trained_steps_per_sample": int(batch.steps.shape[1]),
            "pipeline_passes": {"forward": counter.forward, "backward": counter.backward},
            "peak_gib": {"pipeline": max(r["peak"] for r in timed), "raw": max(r["raw_peak"] for r in timed)}}


def measure_steps(args) -> dict:
    """Run in a subprocess: the rollout and update measurements on one engine."""
    import torch

    from flash_grpo_core.engine import iteration

    bench_args = iteration_cost.parse_args(iteration_argv(args))
    params = iteration_cost.bench_params(bench_args, "flash")
    params = dataclasses.replace(params, rollout=dataclasses.replace(params.rollout, batch_size=args.rollout_batch))
    engine = iteration_cost.bench_engine(bench_args, params)
    meter = Meter(engine.device)
    prompts = ["a red square moving left"]
    embeds = iteration.encode(engine, prompts)
    result = {"device": torch.cuda.get_device_name() if meter.cuda else platform.processor() or "cpu",
              "device_type": engine.device.type, "torch": torch.__version__, "memory_kind": meter.memory_kind,
              "latent_shape": list(engine.stack.latent_shape(params.rollout.frames, params.rollout.height,
                                                             params.rollout.width)),
              "lora": params.model.finetune == "lora", "gradient_checkpointing": params.model.gradient_checkpointing,
              "guidance": params.rollout.guidance}
    rollout = None
    if "rollout" in args.parts or "update" in args.parts:
        result["rollout"], rollout = measure_rollout(engine, meter, prompts, embeds, args.repeats)
    if "update" in args.parts:
        result["update"] = measure_update(engine, meter, prompts, embeds, rollout, args.repeats)
    return result


def child(module: str, argv: list[str]) -> dict:
    """Run a measurement in a fresh process (its peak memory its own), `python -m module` from the
    repository root; returns its JSON line."""
    out = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode:
        sys.exit(f"{module} {' '.join(argv)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(results: dict) -> dict[str, float]:
    found = {}
    if "rollout" in results:
        r = results["rollout"]
        found["rollout/raw (sampling)"] = r["pipeline_sampling_s_per_video"] / r["raw_s_per_video"]
        found["rollout/raw (with decode)"] = r["pipeline_s_per_video"] / r["raw_s_per_video"]
    if "update" in results:
        found["update/raw"] = results["update"]["pipeline_s_per_item"] / results["update"]["raw_s_per_item"]
    if "iteration" in results:
        flash, full = results["iteration"]["flash"], results["iteration"]["full"]
        found["full/flash iteration"] = full["total_s"] / flash["total_s"]
        found["full/flash update"] = full["update_s"] / flash["update_s"]
    return found


def verdicts(found: dict[str, float]) -> dict[str, bool]:
    """Whether each ratio with a target meets it."""
    return {name: (value <= TARGETS[name][1] if TARGETS[name][0] == "max" else value >= TARGETS[name][1])
            for name, value in found.items() if name in TARGETS}


def _target_text(name: str) -> str:
    if name not in TARGETS:
        return ""
    bound, limit = TARGETS[name]
    return f"{'<=' if bound == 'max' else '>='} {limit:.2f}"


def _setup_line(results: dict) -> str:
    c = results["config"]
    line = (f"One prompt x G={c['group']} videos, N={c['steps']} steps; medians of {c['repeats']} after a warm-up; "
            f"peak memory: {results['memory_kind'].replace('_', ' ')}, GiB.")
    if "latent_shape" in results:
        on = {True: "on", False: "off"}
        line += (f" Latents {'x'.join(map(str, results['latent_shape']))}, guidance {results['guidance']}, LoRA "
                 f"{on[results['lora']]}, gradient checkpointing {on[results['gradient_checkpointing']]}, "
                 f"rollout batch {c['rollout_batch']}, micro-batch {c['micro_batch']}.")
    return line


def _step_rows(results: dict) -> list[str]:
    rows = []
    if "rollout" in results:
        r, peak = results["rollout"], results["rollout"]["peak_gib"]
        rows += [(f"| rollout per video, sampling | {r['pipeline_sampling_s_per_video']:.4f} | "
                  f"{r['raw_s_per_video']:.4f} | {peak['pipeline_sampling']:.2f} | {peak['raw']:.2f} |"),
                 (f"| rollout per video, with decode | {r['pipeline_s_per_video']:.4f} | "
                  f"{r['raw_s_per_video']:.4f} | {peak['pipeline']:.2f} | {peak['raw']:.2f} |")]
    if "update" in results:
        u, peak = results["update"], results["update"]["peak_gib"]
        rows.append(f"| update per trained item | {u['pipeline_s_per_item']:.4f} | {u['raw_s_per_item']:.4f} | "
                    f"{peak['pipeline']:.2f} | {peak['raw']:.2f} |")
    if not rows:
        return []
    return ["| measurement | pipeline s | raw s | peak GiB pipeline | peak GiB raw |",
            "| --- | ---: | ---: | ---: | ---: |", *rows, ""]


def markdown(results: dict) -> str:
    lines = [f"# Pipeline step against raw transformer calls, {results['arch']} on {results['device']}", "",
             _setup_line(results), "", *_step_rows(results)]
    if "iteration" in results:
        lines += ["Per iteration (bench/costs/iteration_cost.py):", "",
                  "| mode | rollout s | update s | total s | peak GiB |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {mode} | {it['rollout_s']:.3f} | {it['update_s']:.3f} | {it['total_s']:.3f} | "
                  f"{it['peak_memory_gib']:.2f} |" for mode, it in results["iteration"].items()]
        lines.append("")
    lines += ["| ratio | measured | target | meets it |", "| --- | ---: | --- | --- |"]
    verdict = {True: "yes", False: "no", None: ""}
    for name, value in results["ratios"].items():
        lines.append(f"| {name} | {value:.2f} | {_target_text(name)} | {verdict[results['meets_target'].get(name)]} |")
    met = [name for name, ok in results["meets_target"].items() if ok]
    missed = [name for name, ok in results["meets_target"].items() if not ok]
    lines += ["", f"Meets its target: {', '.join(met) or 'none'}. Misses it: {', '.join(missed) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_steps(args)))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = {"arch": args.arch}
    if "rollout" in args.parts or "update" in args.parts:
        results.update(child("bench.costs.gpu_step", [*passthrough, "--one"]))
        print(f"rollout and update measured on {results['device']}", flush=True)
    if "iteration" in args.parts:
        modes = {mode: child(iteration_cost.MODULE, [*iteration_argv(args), "--one-mode", mode])
                 for mode in ("flash", "full")}
        results["iteration"] = modes
        results.setdefault("device", modes["flash"]["device"])
        results.setdefault("memory_kind", modes["flash"]["peak_memory_kind"])
    # out_dir is where the record went, not how it was measured (and a machine's path)
    results["config"] = {k: v for k, v in vars(args).items() if k not in ("one", "out_dir")}
    results["ratios"] = ratios(results)
    results["meets_target"] = verdicts(results["ratios"])
    results["targets"] = {name: {"bound": bound, "limit": limit} for name, (bound, limit) in TARGETS.items()}
    on_gpu = results.get("memory_kind") == "cuda_allocated"
    tag = args.tag or f"{args.arch}-{'cuda' if on_gpu else 'cpu'}"
    table = markdown(results)
    write_results(f"gpu_step-{tag}", results, table, args.out_dir)
    print(table)


if __name__ == "__main__":
    main()
