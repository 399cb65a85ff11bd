"""Pipeline overhead per stage: model compute vs everything else (interpreter, imports, I/O, DVC).

    python bench/pipeline_overhead.py [--size default|realistic]

In a scratch git + DVC copy of the project, runs each stage of one iteration with
`dvc repro --single-item` and times it; the stage's own timings (manifest.json, metrics.json) give
its model compute (sampling + decoding for rollout, the update for update), the rest is overhead.
Also times a bare `import` of the core (the floor of any stage's overhead) and a no-op `dvc repro`
(median of 3). `--size realistic` enlarges the tiny preset (B=8 prompts x G=8, 17 frames at 64x64)
so compute is not negligible. Targets: overhead < 10% of rollout and update, no-op repro < 5 s.
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


def _timed(args, cwd) -> float:
    from flash_grpo_core.workspace import tool_env

    began = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
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


def measure(size: str) -> dict:
    from flash_grpo_core.workspace import copy_project

    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory() as scratch:
        project = copy_project(ROOT, Path(scratch))
        _configure(project, size)
        walls = {stage: _timed([dvc, "repro", "--single-item", stage], project) for stage in STAGES}
        run = project / "runs" / "tiny" / "it1"
        manifest = json.loads((run / "rollout" / "manifest.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        imports = statistics.median(_timed([sys.executable, "-c", "import flash_grpo_core.models, stages.rollout"],
                                           project) for _ in range(3))
        noop = statistics.median(_timed([dvc, "repro"], project) for _ in range(3))
    compute = {"rollout@1": manifest["sample_seconds"], "update@1": metrics["train_seconds"]}
    rows = []
    for stage, wall in walls.items():
        row = {"stage": stage, "wall_s": round(wall, 3)}
        if stage in compute:
            row.update(compute_s=round(compute[stage], 3), overhead_s=round(wall - compute[stage], 3),
                       overhead_fraction=round((wall - compute[stage]) / wall, 3))
        rows.append(row)
    return {"size": size, "rollout_overrides": REALISTIC if size == "realistic" else {}, "stages": rows,
            "import_core_s": round(imports, 3), "noop_repro_s": round(noop, 3),
            "targets": {"overhead_fraction_max": 0.10, "noop_repro_s_max": 5.0}}


def _table(result: dict) -> str:
    lines = [f"# Pipeline overhead ({result['size']} tiny preset)", "",
             "| stage | wall s | model compute s | overhead s | overhead % |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in result["stages"]:
        if "compute_s" in row:
            lines.append(f"| {row['stage']} | {row['wall_s']:.2f} | {row['compute_s']:.2f} | {row['overhead_s']:.2f} | "
                         f"{100 * row['overhead_fraction']:.0f}% |")
        else:
            lines.append(f"| {row['stage']} | {row['wall_s']:.2f} | | | |")
    lines += ["", f"- importing the core (torch, diffusers, transformers, peft): {result['import_core_s']:.2f} s",
              f"- no-op `dvc repro`: {result['noop_repro_s']:.2f} s (target < 5 s)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["default", "realistic"], default="realistic")
    args = parser.parse_args(argv)
    result = measure(args.size)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pipeline_overhead-{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _table(result)
    (out / f"pipeline_overhead-{args.size}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
