"""Wall time of the GPU stages of iteration 1 on 1 against 2 processes (the tiny preset, on CPU).

    python -m bench.costs.process_scaling [--size default|realistic|clip|large] [--repeats 3]

In a scratch git + DVC copy of the project, `dvc repro score@1` (one process) makes the inputs;
then `rollout@1`, `score@1`, `update@1` and `eval_checkpoint@1` run in that order, each as its
`dvc.yaml` command run directly (`python -m stages.<name> ...`, the paths as DVC resolves them),
with FLASH_GRPO_NPROC_PER_NODE=1 and =2 one after the other (stages/runtime/launch.py starts torchrun
for 2), OMP_NUM_THREADS=1 (`--threads`: each process computes on one core, so 1 against 2
processes is 1 against 2 cores) and FLASH_GRPO_WARM=0 (a fresh process per stage). Both process
counts write the same outputs (docs/distributed.md), so every run of a stage finds the inputs it
expects. Reports per stage the medians over `--repeats` of the wall time (start-up, imports and
torchrun included) and of the seconds the stage's summary line reports (from the start of its
body on rank 0), their 1-process / 2-process ratio, the stage's units of work that ranks split,
and the machine's core count. Sizes are bench/costs/pipeline_overhead.py's workloads of the tiny model
(`default`: 2 prompts x 4 samples of 9 frames at 32x32). Writes
bench/results/process_scaling-<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# importable once the project root is on the path
from bench.costs import pipeline_overhead
from bench.results_io import RESULTS, write_results

STAGES = ("rollout@1", "score@1", "update@1", "eval_checkpoint@1")
PROCESSES = (1, 2)
SUMMARY_SECONDS = re.compile(r"processes=(\d+) seconds=([0-9.]+)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.costs.process_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(pipeline_overhead.SIZES), default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def stage_env(processes: int, threads: int) -> dict[str, str]:
    """The environment of one stage run: its process count, threads, no warm runner."""
    from flash_grpo_core.pipeline.workspace import tool_env

    return tool_env(FLASH_GRPO_NPROC_PER_NODE=str(processes), OMP_NUM_THREADS=str(threads), FLASH_GRPO_WARM="0",
                    FLASH_GRPO_DIST_TIMEOUT="300")


def stage_argv(command: str) -> list[str]:
    """A `dvc.yaml` stage command as an argument list; only `python -m stages.<name> ...` is expected."""
    argv = shlex.split(command)
    if argv[:2] != ["python", "-m"] or not argv[2].startswith("stages."):
        raise ValueError(f"not a stage command: {command!r}")
    return argv


def stage_commands(project: Path, stages=STAGES) -> dict[str, list[str]]:
    """The commands of `stages` as DVC resolves them from the project's dvc.yaml (foreach, ${...})."""
    from dvc.repo import Repo

    top = (project / "dvc.yaml").resolve()
    with Repo(str(project)) as repo:
        commands = {stage.name: stage.cmd for stage in repo.index.stages if Path(stage.path).resolve() == top}
    return {name: stage_argv(commands[name]) for name in stages}


def work_units(params, eval_prompts: int, trained_items: int) -> dict[str, int]:
    """What the ranks split per stage: shards (rollout, score), trained items (update, from its
    metrics), sampling units of `rollout.batch_size` prompts (eval); with fewer units than processes
    a process idles."""
    r = params.rollout
    shards = math.ceil(r.prompts_per_iteration / params.pipeline.groups_per_shard)
    evaluated = min(params.eval.num_prompts, eval_prompts)
    return {"rollout@1": shards, "score@1": shards, "update@1": trained_items,
            "eval_checkpoint@1": math.ceil(evaluated / r.batch_size)}


def run_stage(argv: list[str], project: Path, processes: int, threads: int) -> tuple[float, float]:
    """(wall seconds, the stage's own seconds) of one run; fails loudly if it did not run on `processes`."""
    began = time.perf_counter()
    done = subprocess.run(argv, cwd=project, env=stage_env(processes, threads), capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - began
    found = SUMMARY_SECONDS.search(done.stdout)
    if done.returncode or found is None or int(found.group(1)) != processes:
        sys.exit(f"{' '.join(argv)} on {processes} process(es) failed ({done.returncode}):\n"
                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, float(found.group(2))


def scaling_rows(walls: dict, bodies: dict, units: dict[str, int]) -> list[dict]:
    """Per stage: median wall and own seconds per process count and the 1-process / 2-process ratios.

    `walls` and `bodies` map stage -> process count -> a list of seconds."""
    rows = []
    for stage in walls:
        one, two = (statistics.median(walls[stage][n]) for n in PROCESSES)
        body_one, body_two = (statistics.median(bodies[stage][n]) for n in PROCESSES)
        rows.append({"stage": stage, "units": units[stage], "wall_1_s": round(one, 3), "wall_2_s": round(two, 3),
                     "wall_ratio": round(one / two, 3), "own_1_s": round(body_one, 3), "own_2_s": round(body_two, 3),
                     "own_ratio": round(body_one / body_two, 3) if body_two > 0 else None})
    return rows


def markdown(result: dict) -> str:
    cores = result["cores"]
    setup = (f"{cores} CPU cores; OMP_NUM_THREADS={result['threads']} per process; medians of {result['repeats']}; "
             f"load average {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after. Wall: the "
             "stage's command from start to exit. Own: the seconds its summary line reports (on rank 0, from the "
             "start of the stage's body: the process group, the imports done there, the model build, the compute "
             "and the writes; not the interpreter's start nor torchrun's). Ratio: 1-process seconds / 2-process "
             "seconds (above 1: faster on 2). Units: the pieces of work the ranks split.")
    caveat = (f"On a machine with {cores} cores a second process can only help when the stage's work is "
              "compute-bound and a core is free for it: the second process pays its own interpreter start, "
              "imports, model build and process-group set-up, a stage with fewer units of work than processes "
              "leaves one of them idle, and other jobs on the machine take the cores a second process would use.")
    lines = [f"# Stages on 1 against 2 processes ({result['size']} tiny preset)", "", setup, "",
             "| stage | units | wall 1 proc s | wall 2 proc s | wall ratio | own 1 proc s | own 2 proc s | own ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["stages"]:
        own = "" if row["own_ratio"] is None else f"{row['own_ratio']:.2f}"
        lines.append(f"| {row['stage']} | {row['units']} | {row['wall_1_s']:.2f} | {row['wall_2_s']:.2f} | "
                     f"{row['wall_ratio']:.2f} | {row['own_1_s']:.2f} | {row['own_2_s']:.2f} | {own} |")
    return "\n".join([*lines, "", caveat]) + "\n"


def measure(size: str, repeats: int, threads: int) -> dict:
    from flash_grpo_core.artifacts.prompts import read_prompts_parquet
    from flash_grpo_core.config import load_params
    from flash_grpo_core.pipeline.workspace import copy_project

    with tempfile.TemporaryDirectory() as scratch:
        project = copy_project(ROOT, Path(scratch), preset="tiny")
        pipeline_overhead.configure_size(project, size)
        dvc = str(Path(sys.executable).parent / "dvc")
        made = subprocess.run([dvc, "repro", "score@1"], cwd=project, env=stage_env(1, threads), capture_output=True,
                              text=True, check=False)
        if made.returncode:
            sys.exit(f"dvc repro score@1 failed:\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}")
        commands = stage_commands(project)
        load_before = os.getloadavg()
        walls = {stage: {n: [] for n in PROCESSES} for stage in STAGES}
        bodies = {stage: {n: [] for n in PROCESSES} for stage in STAGES}
        for _ in range(repeats):
            for stage in STAGES:  # in pipeline order: each stage's inputs are the previous one's outputs
                for processes in PROCESSES:
                    wall, own = run_stage(commands[stage], project, processes, threads)
                    walls[stage][processes].append(wall)
                    bodies[stage][processes].append(own)
                    print(f"{stage} on {processes}: {wall:.2f} s", flush=True)
        trained = json.loads((project / "runs" / "tiny" / "it1" / "metrics.json").read_text())["trained_items"]
        units = work_units(load_params(project / "params.yaml"),
                           len(read_prompts_parquet(project / "runs" / "prompts" / "eval.parquet")), int(trained))
    return {"size": size, "rollout_overrides": pipeline_overhead.SIZES[size], "repeats": repeats, "threads": threads,
            "cores": os.cpu_count(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
            "stages": scaling_rows(walls, bodies, units), "raw": {"wall_s": walls, "own_s": bodies}}


def main(argv=None) -> None:
    args = parse_args(argv)
    result = measure(args.size, args.repeats, args.threads)
    table = markdown(result)
    write_results(f"process_scaling-{args.size}", result, table, args.out_dir)
    print(table)


if __name__ == "__main__":
    main()
