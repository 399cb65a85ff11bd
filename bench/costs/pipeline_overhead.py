"""Pipeline overhead per stage: model compute vs everything else (interpreter, imports, I/O, DVC).

    python -m bench.costs.pipeline_overhead [--size default|realistic|clip|large]

In a scratch git + DVC copy of the project (one iteration), times every stage two ways: each alone
with `dvc repro --single-item <stage>` (DVC starts once per stage, as when reproducing one stage),
and all in one `dvc repro --force` (as a run goes: DVC starts once, and a stage's share runs from
its start to the next stage's start, so it includes DVC hashing, caching and locking its outputs).
The stage's own timings (manifest.json, metrics.json) give its model compute (prompt encoding,
sampling and decoding for rollout; the update for update); the rest is overhead. It does so twice
in one run: cold (every stage a fresh process) and warm (with `python -m stages.runtime.warm` running,
stages/runtime/warm.py), in fresh copies each. Also times a bare `import` of the core (the floor of a cold
stage's overhead) and a no-op `dvc repro` (median of 3). Sizes of the tiny model's workload:
`default` is the preset itself (B=2 prompts x G=4, 9 frames at 32x32), `realistic` B=8 x G=8 at
17 frames of 64x64, `clip` B=8 x G=8 at 33 frames of 128x128, `large` the same at 256x256.
Targets: overhead < 10% of rollout and update, no-op repro < 5 s.
Writes bench/results/pipeline_overhead-<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # importable once the project root is on the path

SIZES = {  # rollout overrides of the tiny preset
    "default": {},
    "realistic": {"prompts_per_iteration": 8, "group_size": 8, "frames": 17, "height": 64, "width": 64, "batch_size": 16},
    "clip": {"prompts_per_iteration": 8, "group_size": 8, "frames": 33, "height": 128, "width": 128, "batch_size": 16},
    "large": {"prompts_per_iteration": 8, "group_size": 8, "frames": 33, "height": 256, "width": 256, "batch_size": 16},
}
STAGES = ("curate", "init", "rollout@1", "score@1", "update@1", "eval_checkpoint@0", "eval_checkpoint@1", "evaluate")


def _timed(args, cwd, env=None) -> float:
    from flash_grpo_core.pipeline.workspace import tool_env

    began = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def configure_size(project: Path, size: str) -> None:
    from ruamel.yaml import YAML

    subprocess.run([sys.executable, "-m", "flash_grpo_core.pipeline.iterations", "1"], cwd=project, check=True, capture_output=True)
    if SIZES[size]:
        yaml = YAML()
        path = project / "params.yaml"
        data = yaml.load(path.read_text())
        data["presets"]["tiny"]["rollout"].update(SIZES[size])
        with open(path, "w") as handle:
            yaml.dump(data, handle)


def _start_warm(project: Path, env: dict) -> subprocess.Popen:
    """`python -m stages.runtime.warm` in the scratch project; returns once it listens."""
    log = project / "warm.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "stages.runtime.warm"], cwd=project, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)
    while "listening" not in log.read_text():
        if server.poll() is not None:
            sys.exit(f"the warm runner did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return server


def _timed_repro(dvc: str, project: Path, env: dict) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """One `dvc repro --force` of every stage: (total s, DVC start-up s, {stage: share s}, {stage: DVC s}).

    A stage's share runs from DVC's "Running stage" line to the next one (or DVC's exit): its
    command, then DVC hashing and caching its outputs and rewriting dvc.lock, then checking the
    next stage. The DVC part is the time from the stage's summary line (its last act) to the end of
    its share. Start-up is everything before the first stage (DVC's imports, reading the project).
    """
    began = time.perf_counter()
    marks: list[tuple[str, float]] = []
    finished: dict[str, float] = {}
    process = subprocess.Popen([dvc, "repro", "--force"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in process.stdout:
        lines.append(line)
        now = time.perf_counter() - began
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], now))
        elif marks and line.startswith(marks[-1][0].split("@")[0] + ": "):
            finished[marks[-1][0]] = now
    if process.wait():
        sys.exit(f"dvc repro --force failed:\n{''.join(lines[-40:])}")
    total = time.perf_counter() - began
    ends = [at for _, at in marks[1:]] + [total]
    shares = {stage: end - at for (stage, at), end in zip(marks, ends)}
    after = {stage: end - finished[stage] for (stage, _), end in zip(marks, ends)}
    return total, marks[0][1], shares, after


def _compute(project: Path) -> dict[str, float]:
    """Model compute of the last rollout@1 and update@1 runs, from their own timings."""
    run = project / "runs" / "tiny" / "it1"
    manifest = json.loads((run / "rollout" / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    return {"rollout@1": manifest["sample_seconds"], "update@1": metrics["train_seconds"]}


def _rows(walls: dict[str, float], compute: dict[str, float], dvc_after: dict[str, float] | None = None) -> list[dict]:
    rows = []
    for stage in STAGES:
        row = {"stage": stage, "wall_s": round(walls[stage], 3)}
        if dvc_after is not None:
            row["dvc_after_s"] = round(dvc_after[stage], 3)
        if stage in compute:
            overhead = walls[stage] - compute[stage]
            row.update(compute_s=round(compute[stage], 3), overhead_s=round(overhead, 3),
                       overhead_fraction=round(overhead / walls[stage], 3))
        rows.append(row)
    return rows


def measure(size: str, warm: bool) -> dict:
    from flash_grpo_core.pipeline.workspace import copy_project, tool_env

    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory() as scratch:
        project = copy_project(ROOT, Path(scratch), preset="tiny")
        configure_size(project, size)
        env = tool_env(FLASH_GRPO_WARM_SOCKET=str(Path(scratch) / "warm.sock"), FLASH_GRPO_WARM="1" if warm else "0")
        server = _start_warm(project, env) if warm else None
        try:
            single = {stage: _timed([dvc, "repro", "--single-item", stage], project, env) for stage in STAGES}
            single_compute = _compute(project)
            noop = statistics.median(_timed([dvc, "repro"], project, env) for _ in range(3))
            whole, startup, shares, after = _timed_repro(dvc, project, env)
            whole_compute = _compute(project)
            served = (project / "warm.log").read_text().count("warm: stages.") if warm else 0
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
        imports = statistics.median(_timed([sys.executable, "-c", "import flash_grpo_core.models.wan, stages.rollout"],
                                           project) for _ in range(3))
    if warm and served < 2 * len(STAGES):
        sys.exit(f"only {served} of {2 * len(STAGES)} stage runs ran warm")
    return {"size": size, "warm": warm, "rollout_overrides": SIZES[size],
            "in_one_repro": _rows(shares, whole_compute, after), "dvc_startup_s": round(startup, 3),
            "whole_repro_s": round(whole, 3), "single_stage": _rows(single, single_compute),
            "import_core_s": round(imports, 3), "noop_repro_s": round(noop, 3),
            "targets": {"overhead_fraction_max": 0.10, "noop_repro_s_max": 5.0}}


def _stage_table(rows: list[dict]) -> list[str]:
    dvc = "dvc_after_s" in rows[0]
    lines = ["| stage | wall s | model compute s | overhead s | overhead % |" + (" of it after the stage's summary line s |" if dvc else ""),
             "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if dvc else "")]
    for row in rows:
        cells = [row["stage"], f"{row['wall_s']:.2f}"]
        if "compute_s" in row:
            cells += [f"{row['compute_s']:.2f}", f"{row['overhead_s']:.2f}", f"{100 * row['overhead_fraction']:.0f}%"]
        else:
            cells += ["", "", ""]
        if dvc:
            cells.append(f"{row['dvc_after_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _table(results: list[dict]) -> str:
    size = results[0]["size"]
    lines = [f"# Pipeline overhead ({size} tiny preset)", ""]
    for result in results:
        mode = "warm (python -m stages.runtime.warm running)" if result["warm"] else "cold (a fresh process per stage)"
        lines += [f"## {mode}", "", (f"Every stage in one `dvc repro --force` ({result['whole_repro_s']:.2f} s; "
                                    f"DVC start-up before the first stage {result['dvc_startup_s']:.2f} s; a stage's "
                                    "share runs from its start to the next stage's start; after its summary line "
                                    "come the process's exit and DVC hashing, caching and locking its outputs):"), "", *_stage_table(result["in_one_repro"]), "",
                  "Each stage alone, `dvc repro --single-item <stage>` (DVC starts once per stage):", "",
                  *_stage_table(result["single_stage"]), "",
                  f"- no-op `dvc repro`: {result['noop_repro_s']:.2f} s (target < 5 s)", ""]
    lines.append(f"- importing the core (torch, diffusers, transformers, peft) in a fresh process: "
                 f"{results[0]['import_core_s']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.costs.pipeline_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="realistic")
    args = parser.parse_args(argv)
    results = [measure(args.size, warm=False), measure(args.size, warm=True)]
    table = _table(results)
    write_results(f"pipeline_overhead-{args.size}", results, table + "\n")
    print(table)


if __name__ == "__main__":
    main()
