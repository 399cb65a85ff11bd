"""Where a LoRA update's time goes: one CFG pair's forward+backward under each way of training.

    python -m bench.costs.lora_cost                                                       # tiny shape, CPU (tested)
    python -m bench.costs.lora_cost --arch wan1_3b --height 480 --width 832 --frames 81   # one GPU
    python -m bench.costs.lora_cost --arch wan1_3b --layers 2 --height 256 --width 512 --frames 13 \
        --dtype bfloat16                                                                  # 2 blocks at Wan's width, CPU

A LoRA r16 update measured 26% slower than a full-weight backward on an H200 (1.3B at 480x832x81:
3.31 s against 2.63 s per sample), although it computes no weight gradient of the base. On the
transformer of bench/costs/iteration_cost.py (random weights, Wan 2.1's architecture on a GPU), one
video's CFG pair (as bench/costs/gpu_step.py's raw update) is run forward and backward under:

- `full`: every weight trainable (the full-weight backward the LoRA update was compared with);
- `lora`: peft's LoRA as the measurement above ran it (adapters in float32 over the base's
  dtype, so peft casts each adapted layer's input to float32 and its output back;
  `model.lora_compute: float32`);
- `lora-compute-input`: the same float32 adapters multiplying in the base's dtype, as the pipeline
  trains by default (`model.lora_compute: input`: their weights cast per call, not each input);
- `lora-base-dtype`: the same adapters stored in the base's dtype (no casts at all, but bf16
  adapters would not train: the bound `lora-compute-input` can reach; with a float32 base both
  are `lora` again);
- `no-weight-grads`: the LoRA model with nothing trainable, the gradient taken with respect to the
  input latents: the backward through the frozen base (and the float32 adapters' casts), the
  floor of an update with float32 adapters;

each with gradient checkpointing off, on, and on every n-th block only (`--checkpointing off on 2`:
`model.checkpoint_every` 2, half the blocks recomputed). Medians over `--repeats` after a
warm-up, per CFG pair, with peak memory (CUDA allocator peak; on CPU the process's peak RSS). The
ratios to `full` at the same checkpointing say which of the casts, peft's unmerged path or the
recomputation costs what. Writes bench/results/lora_cost-<arch>-<device>[-TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# importable once the project root is on the path
from bench.costs import gpu_step, iteration_cost
from bench.results_io import RESULTS, write_results

WAYS = ("full", "lora", "lora-compute-input", "lora-base-dtype", "no-weight-grads")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.costs.lora_cost", description=__doc__.splitlines()[0])
    iteration_cost.add_model_arguments(parser)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], type=_checkpointing, metavar="off|on|N",
                        help="off, on (every block) or N (every N-th block)")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only this many transformer blocks (Wan's width on a machine that cannot run all)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the base's dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--tag", default=None, help="suffix of the output files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.layers is not None and (args.arch == "tiny" or args.layers < 1):
        parser.error("--layers takes a whole number of at least 1 and applies to the Wan architectures")
    return args


def _checkpointing(text: str) -> int:
    """0: off; n: every n-th block recomputed (on: 1)."""
    if text in ("off", "on"):
        return int(text == "on")
    if text.isdigit() and int(text) >= 2:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected off, on or an integer >= 2, got {text!r}")


def _label(every: int) -> str:
    return {0: "off", 1: "on"}.get(every, f"every {every}")


def engine_for(args, way: str, checkpointing: int):
    """The bench engine of one way of training (bench/costs/iteration_cost.py's model at this shape)."""
    bench_args = iteration_cost.parse_args(gpu_step.iteration_argv(argparse.Namespace(
        arch=args.arch, device=args.device, group=2, steps=20, micro_batch=1, repeats=args.repeats,
        height=args.height, width=args.width, frames=args.frames)))
    bench_args.layers = args.layers
    params = iteration_cost.bench_params(bench_args, "flash")
    model = dataclasses.replace(params.model, finetune="full" if way == "full" else "lora", dtype=args.dtype,
                                lora_compute="input" if way == "lora-compute-input" else "float32",
                                gradient_checkpointing=checkpointing > 0, checkpoint_every=max(checkpointing, 1))
    engine = iteration_cost.bench_engine(bench_args, dataclasses.replace(params, model=model))
    trainable = engine.policy.parameters.values()
    if way == "lora-base-dtype":
        from flash_grpo_core.engine.sampler import compute_dtype

        dtype = compute_dtype(engine.policy.transformer)
        for parameter in trainable:
            parameter.data = parameter.data.to(dtype)
    if way == "no-weight-grads":
        for parameter in trainable:
            parameter.requires_grad_(False)
    return engine


def forward_backward(engine, inputs, input_grad: bool) -> None:
    latents, context, timesteps = inputs
    if input_grad:
        latents = latents.detach().requires_grad_(True)
    out = engine.policy.transformer(hidden_states=latents, timestep=timesteps[0].expand(len(latents)),
                                    encoder_hidden_states=context, return_dict=False)[0]
    out.float().square().mean().backward()
    for parameter in engine.policy.parameters.values():
        parameter.grad = None


def measure(args, way: str, checkpointing: int) -> dict:
    """Median seconds and peak memory of one CFG pair's forward+backward."""
    import torch

    from flash_grpo_core.engine import iteration
    from flash_grpo_core.engine.sampler import compute_dtype

    engine = engine_for(args, way, checkpointing)
    meter = gpu_step.Meter(engine.device)
    inputs = gpu_step.raw_inputs(engine, iteration.encode(engine, ["a red square moving left"]))
    transformer = engine.policy.transformer
    transformer.train()
    result = {"way": way, "checkpointing": checkpointing, "memory_kind": meter.memory_kind,
              "device": torch.cuda.get_device_name() if meter.cuda else platform.processor() or "cpu",
              "dtype": str(compute_dtype(engine.policy.transformer))}
    try:
        forward_backward(engine, inputs, way == "no-weight-grads")  # warm-up
        meter.reset_peak()
        seconds = [meter.timed(forward_backward, engine, inputs, way == "no-weight-grads")[0]
                   for _ in range(args.repeats)]
        result |= {"seconds": statistics.median(seconds), "peak_gib": meter.peak_gib()}
    except torch.OutOfMemoryError:  # without checkpointing at full size: a row that says so, the others still run
        result |= {"seconds": None, "peak_gib": None}
    del engine, inputs, transformer
    gc.collect()
    if meter.cuda:
        torch.cuda.empty_cache()
    return result


def markdown(args, rows: list[dict]) -> str:
    full = {row["checkpointing"]: row["seconds"] for row in rows if row["way"] == "full" and row["seconds"]}
    blocks = f" ({args.layers} blocks)" if args.layers else ""
    shape = f" at {args.height}x{args.width}x{args.frames}" if None not in (args.height, args.width, args.frames) else ""
    lines = [f"# LoRA cost, {args.arch}{blocks}{shape} on {rows[0]['device']}", "",
             (f"One CFG pair's forward+backward, median of {args.repeats}; compute dtype {rows[0]['dtype']}; "
              f"peak memory as {rows[0]['memory_kind']}."), "",
             "| way | checkpointing | s per pair | / full (same checkpointing) | / full (off) | peak GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["seconds"] is None:
            lines.append(f"| {row['way']} | {_label(row['checkpointing'])} | out of memory | | | |")
            continue
        same, off = (row["seconds"] / full[key] if key in full else float("nan") for key in (row["checkpointing"], 0))
        lines.append(f"| {row['way']} | {_label(row['checkpointing'])} | {row['seconds']:.4f} | {same:.2f} | "
                     f"{off:.2f} | {row['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    for every in args.checkpointing:
        for way in args.ways:
            rows.append(measure(args, way, every))
            print(json.dumps(rows[-1]), flush=True)  # a run cut short by its time limit keeps what it measured
    device = "cuda" if rows[0]["memory_kind"] == "cuda_allocated" else "cpu"
    name = f"lora_cost-{args.arch}-{device}{'-' + args.tag if args.tag else ''}"
    text = markdown(args, rows)
    write_results(name, {"arch": args.arch, "layers": args.layers, "rows": rows}, text, args.out_dir)
    print(text)


if __name__ == "__main__":
    main()
