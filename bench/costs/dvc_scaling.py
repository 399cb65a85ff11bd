"""How DVC's per-iteration bookkeeping grows with the number of iterations in one dvc.yaml.

    python -m bench.costs.dvc_scaling [--iterations 40]

In a scratch git + DVC copy of the project (the tiny preset, evaluation of the base and the last
checkpoint only), with `python -m stages.runtime.warm` running, one `dvc repro` runs every iteration. Per
iteration it records the wall time from `rollout@k` starting to `rollout@k+1` starting and the time
spent inside the stages' bodies (the `seconds=` of each stage's summary line); the rest is
pipeline overhead: process start, DVC checking, hashing, caching, and rewriting dvc.lock after each
stage (DVC parses and dumps the whole lock file, which gains every stage's entry). Then a no-op
`dvc repro` (median of 3) with the full lock. Writes bench/results/dvc_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.costs.pipeline_overhead import _start_warm, _timed
from bench.results_io import write_results

_STARTED = re.compile(r"Running stage '(\w+)@(\d+)'")
_SUMMARY = re.compile(r"^(rollout|score|update): iteration=(\d+) .*seconds=([0-9.]+)$")


def measure(iterations: int) -> dict:
    from flash_grpo_core.pipeline.workspace import copy_project, tool_env

    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory() as scratch:
        project = copy_project(ROOT, Path(scratch), preset="tiny")
        params = project / "params.yaml"
        params.write_text(params.read_text().replace("  eval_every: 1\n", "  eval_every: 0\n", 1))
        subprocess.run([sys.executable, "-m", "flash_grpo_core.pipeline.iterations", str(iterations)], cwd=project, check=True,
                       capture_output=True)
        env = tool_env(FLASH_GRPO_WARM_SOCKET=str(Path(scratch) / "warm.sock"), FLASH_GRPO_WARM="1")
        server = _start_warm(project, env)
        try:
            began = time.perf_counter()
            starts: dict[int, float] = {}
            inside: dict[int, float] = {}
            process = subprocess.Popen([dvc, "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, bufsize=1)
            tail = []
            for line in process.stdout:
                tail = [*tail[-40:], line]
                started = _STARTED.match(line)
                if started and started.group(1) == "rollout":
                    starts[int(started.group(2))] = time.perf_counter() - began
                elif started and started.group(1) == "eval_checkpoint" and iterations + 1 not in starts:
                    starts[iterations + 1] = time.perf_counter() - began  # the end of the last iteration
                summary = _SUMMARY.match(line.strip())
                if summary:
                    k = int(summary.group(2))
                    inside[k] = inside.get(k, 0.0) + float(summary.group(3))
            if process.wait():
                sys.exit(f"dvc repro failed:\n{''.join(tail)}")
            noop = statistics.median(_timed([dvc, "repro"], project, env) for _ in range(3))
            lock_lines = len((project / "dvc.lock").read_text().splitlines())
        finally:
            server.terminate()
            server.wait(timeout=30)
    rows = []
    for k in range(1, iterations + 1):
        wall = starts[k + 1] - starts[k]
        rows.append({"iteration": k, "wall_s": round(wall, 3), "in_stages_s": round(inside[k], 3),
                     "overhead_s": round(wall - inside[k], 3)})
    return {"iterations": iterations, "rows": rows, "noop_repro_s": round(noop, 3), "lock_lines": lock_lines}


def _slope(rows: list[dict]) -> float:
    """Least-squares growth of the overhead per iteration, seconds per iteration."""
    xs = [row["iteration"] for row in rows]
    ys = [row["overhead_s"] for row in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _table(result: dict) -> str:
    rows = result["rows"]
    n = result["iterations"]
    marks = sorted({1, *range(5, n + 1, 5), n})
    lines = [f"# DVC bookkeeping over {n} iterations (tiny preset, warm stages)", "",
             "| iteration | wall s | inside stages s | overhead s |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {rows[k - 1]['iteration']} | {rows[k - 1]['wall_s']:.2f} | {rows[k - 1]['in_stages_s']:.2f} | "
              f"{rows[k - 1]['overhead_s']:.2f} |" for k in marks]
    first = statistics.median(row["overhead_s"] for row in rows[:5])
    last = statistics.median(row["overhead_s"] for row in rows[-5:])
    lines += ["", (f"- overhead per iteration: median {first:.2f} s over the first 5, {last:.2f} s over the last 5; "
                   f"growth {1000 * _slope(rows):.0f} ms per iteration already in dvc.lock"),
              f"- dvc.lock after {n} iterations: {result['lock_lines']} lines",
              f"- no-op `dvc repro` with that lock: {result['noop_repro_s']:.2f} s (target < 5 s)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.costs.dvc_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args(argv)
    result = measure(args.iterations)
    result["growth_s_per_iteration"] = round(_slope(result["rows"]), 4)
    table = _table(result)
    write_results("dvc_scaling", result, table + "\n")
    print(table)


if __name__ == "__main__":
    main()
