"""Pipeline overhead per stage: model compute vs everything else (interpreter, imports, I/O, DVC).

    python bench/pipeline_overhead.py [--size default|realistic]

In a scratch git + DVC copy of the project, runs each stage of one iteration with
`dvc repro --single-item` and times it; the stage's own timings (manifest.json, metrics.json) give
its model compute (sampling + decoding for rollout, the update for update), the rest is overhead.
It does so twice in one run: cold (every stage a fresh process) and warm (with `python -m
stages.warm` running, stages/warm.py), in fresh copies each. Also times a bare `import` of the core
(the floor of a cold stage's overhead), a no-op `dvc repro` (median of 3) and the whole pipeline
rerun by one `dvc repro --force`. `--size realistic`
enlarges the tiny preset (B=8 prompts x G=8, 17 frames at 64x64) so compute is not negligible.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REALISTIC = {"prompts_per_iteration": 8, "group_size": 8, "frames": 17, "height": 64, "width": 64, "batch_size": 16}
STAGES = ("curate", "init", "rollout@1", "score@1", "update@1", "eval_checkpoint@0", "eval_checkpoint@1", "evaluate")


def _timed(args, cwd, env=None) -> float:
    from flash_grpo_core.workspace import tool_env

    began = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def _configure(project: Path, size: str) -> None:
    from ruamel.yaml import YAML

    subprocess.run([sys.executable, "-m", "stages.iterations", "1"], cwd=project, check=True, capture_output=True)
    if size == "realistic":
        yaml = YAML()
        path = project / "params.yaml"
        data = yaml.load(path.read_text())
        data["presets"]["tiny"]["rollout"].update(REALISTIC)
        with open(path, "w") as handle:
            yaml.dump(data, handle)


def _start_warm(project: Path, env: dict) -> subprocess.Popen:
    """`python -m stages.warm` in the scratch project; returns once it listens."""
    log = project / "warm.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "stages.warm"], cwd=project, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)
    while "listening" not in log.read_text():
        if server.poll() is not None:
            sys.exit(f"the warm runner did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return server


def measure(size: str, warm: bool) -> dict:
    from flash_grpo_core.workspace import copy_project, tool_env

    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory() as scratch:
        project = copy_project(ROOT, Path(scratch))
        _configure(project, size)
        env = tool_env(FLASH_GRPO_WARM_SOCKET=str(Path(scratch) / "warm.sock"), FLASH_GRPO_WARM="1" if warm else "0")
        server = _start_warm(project, env) if warm else None
        try:
            walls = {stage: _timed([dvc, "repro", "--single-item", stage], project, env) for stage in STAGES}
            noop = statistics.median(_timed([dvc, "repro"], project, env) for _ in range(3))
            whole = _timed([dvc, "repro", "--force"], project, env)  # every stage again, one DVC process
            served = (project / "warm.log").read_text().count("warm: stages.") if warm else 0
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
        run = project / "runs" / "tiny" / "it1"
        manifest = json.loads((run / "rollout" / "manifest.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        imports = statistics.median(_timed([sys.executable, "-c", "import flash_grpo_core.models, stages.rollout"],
                                           project) for _ in range(3))
    if warm and served < len(STAGES):
        sys.exit(f"only {served} of {len(STAGES)} stages ran warm")
    compute = {"rollout@1": manifest["sample_seconds"], "update@1": metrics["train_seconds"]}
    rows = []
    for stage, wall in walls.items():
        row = {"stage": stage, "wall_s": round(wall, 3)}
        if stage in compute:
            row.update(compute_s=round(compute[stage], 3), overhead_s=round(wall - compute[stage], 3),
                       overhead_fraction=round((wall - compute[stage]) / wall, 3))
        rows.append(row)
    return {"size": size, "warm": warm, "rollout_overrides": REALISTIC if size == "realistic" else {},
            "stages": rows, "import_core_s": round(imports, 3), "noop_repro_s": round(noop, 3),
            "whole_repro_s": round(whole, 3),
            "targets": {"overhead_fraction_max": 0.10, "noop_repro_s_max": 5.0}}


def _table(results: list[dict]) -> str:
    size = results[0]["size"]
    lines = [f"# Pipeline overhead ({size} tiny preset)", ""]
    for result in results:
        lines += [f"## {'warm (python -m stages.warm running)' if result['warm'] else 'cold (a fresh process per stage)'}",
                  "", "| stage | wall s | model compute s | overhead s | overhead % |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row in result["stages"]:
            if "compute_s" in row:
                lines.append(f"| {row['stage']} | {row['wall_s']:.2f} | {row['compute_s']:.2f} | {row['overhead_s']:.2f} | "
                             f"{100 * row['overhead_fraction']:.0f}% |")
            else:
                lines.append(f"| {row['stage']} | {row['wall_s']:.2f} | | | |")
        lines += ["", f"- no-op `dvc repro`: {result['noop_repro_s']:.2f} s (target < 5 s)",
                  f"- the whole pipeline again in one `dvc repro --force`: {result['whole_repro_s']:.2f} s", ""]
    lines.append(f"- importing the core (torch, diffusers, transformers, peft) in a fresh process: "
                 f"{results[0]['import_core_s']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["default", "realistic"], default="realistic")
    args = parser.parse_args(argv)
    results = [measure(args.size, warm=False), measure(args.size, warm=True)]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pipeline_overhead-{args.size}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = _table(results)
    (out / f"pipeline_overhead-{args.size}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
