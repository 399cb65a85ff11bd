"""Fault injection: does the pipeline survive kills, corrupt artifacts and bad inputs?

    python -m bench.faults [--small] [--out-dir bench/results]     # from the repository root

(`python -m bench.faults.run` is the same: bench/faults/__main__.py calls this module's `main`.)

In a scratch git + DVC copy of the project on the tiny preset (2 iterations), one uninterrupted
`dvc repro` is the reference (its runs/ and dvc.lock are kept and put back before every case).
Then three sets of cases, each described in its module:
- kill points (bench/faults/kills.py): a stage interrupted at an exact fault point (between an
  output's write and its rename, after the rename, after the stage before DVC's lock update) or
  during its compute, by SIGKILL of the stage, SIGKILL of `dvc` or Ctrl-C (SIGINT to dvc's process
  group), warm (`python -m stages.runtime.warm`) and cold, then `dvc repro` and every output compared with
  the reference;
- corruptions (bench/faults/corrupt.py): every artifact type truncated, a data byte flipped, a
  header byte flipped, deleted, replaced by a valid file of other content; detected by DVC or by
  the reading stage (exit code 2, the file named), and repaired by `dvc repro`;
- bad inputs (bench/faults/inputs.py): wrong params, prompt files, model folders, checkpoints,
  reward server requests; exit code 2 and a first stderr line naming the key or file (HTTP 4xx);
- bad inputs through `dvc repro` (bench/faults/repro.py, corpus bench/faults/repro_cases.py): each
  bad edit applied to the finished reference workspace, then `dvc repro` as a user runs it; the
  failing stage's exit code, the first line of its message, and every dvc.lock output no longer in
  place with its md5 (`repro.lost`: the cases that lost finished outputs, and which).
`--small` is the version the test suite runs (tests/test_faults.py): the reference ends at
`update@1`, with 2 kill points, 3 corruptions, 8 bad inputs and 4 repro cases. Every count is
measured: a case that fails is recorded as failing, with what happened. Writes
bench/results/faults.{json,md} (`--small`: faults-small.*).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# importable once the project root is on the path
from bench.faults import corrupt, inputs, kills, repro, repro_cases
from bench.faults.report import markdown
from bench.faults.workspace import Workspace
from bench.results_io import RESULTS, write_results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the test suite's version: a few cases of each kind")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def run(small: bool = False, cache_dir: Path | None = None, scratch: Path | None = None) -> dict:
    """Every case of the full (or small) version; the results as faults.json holds them."""
    with tempfile.TemporaryDirectory(prefix="faults-") as temporary:
        workspace = Workspace(Path(scratch or temporary), cache_dir, target="update@1" if small else None)
        try:
            return _run_cases(workspace, small)
        finally:
            workspace.close()


def _run_cases(workspace: Workspace, small: bool) -> dict:
    began = time.perf_counter()
    workspace.start_warm()
    reference = workspace.reference()
    _say(f"reference: `dvc {' '.join(workspace.repro_args())}` in {reference.seconds:.1f} s, "
         f"{len(workspace.reference_hashes)} files")
    kill_results = [_logged(kills.run_kill(workspace, case), "resumed_equal")
                    for case in (kills.SMALL if small else kills.FULL)]
    corruption_results = [_logged(corrupt.run_corruption(workspace, artifact, kind), "detected_named",
                                  "ended_correct")
                          for artifact, kind in (corrupt.SMALL if small else corrupt.FULL)]
    workspace.restore()
    entries = inputs.SMALL if small else inputs.FULL
    bad_inputs = [_logged(inputs.run_bad_input(workspace, entry, number), "clear")
                  for number, entry in enumerate(entries)]
    if not small:
        bad_inputs += [_logged(result, "clear") for result in inputs.run_requests(workspace)]
    inputs.cleanup(workspace)
    repro_results = [_logged(repro.run_repro_case(workspace, case), "passed")
                     for case in (repro_cases.SMALL if small else repro_cases.FULL)]
    return {"version": "small" if small else "full", "preset": "tiny", "iterations": 2,
            "reference": " ".join(["dvc", *workspace.repro_args()]), "seconds": round(time.perf_counter() - began),
            "cores": os.cpu_count(),
            "warm_stage_runs": workspace.warm_served(), **summary(kill_results, corruption_results, bad_inputs),
            "repro": repro.summary(repro_results),
            "cases": {"kill_points": kill_results, "corruptions": corruption_results, "bad_inputs": bad_inputs,
                      "repro": repro_results}}


def summary(kills: list[dict], corruptions: list[dict], bad_inputs: list[dict]) -> dict:
    readers = [case for case in corruptions if case["reader"]]
    return {
        "kill_points": {"tried": len(kills), "resumed_equal": _count(kills, "resumed_equal"),
                        "fired": _count(kills, "fired"), "orphans": sum(case["orphans"] for case in kills),
                        "stages": sorted({case["interrupted_stage"] for case in kills})},
        "corruptions": {"tried": len(corruptions), "detected_named": _count(corruptions, "detected_named"),
                        "ended_correct": _count(corruptions, "ended_correct"),
                        "dvc_detected": _count(corruptions, "dvc_detected"), "reader_tried": len(readers),
                        "reader_named": _count(readers, "reader_named"),
                        "reader_accepted": sum(case["reader_exit"] == 0 for case in readers),
                        "reader_silent": _count(readers, "reader_silent")},
        "bad_inputs": {"tried": len(bad_inputs), "clear_exit2": _count(bad_inputs, "clear")},
        "lost": sum(len(case["lost"]) for case in kills),
    }


def _count(cases: list[dict], key: str) -> int:
    return sum(bool(case[key]) for case in cases)


def _say(line: str) -> None:
    print(line, flush=True)


def _logged(result: dict, *verdicts: str) -> dict:
    """Print one line per case as it ends: ok or FAIL, and a kill point's note."""
    passed = all(result[verdict] for verdict in verdicts)
    note = f": {result['note']}" if result.get("note") else ""
    _say(f"{'ok  ' if passed else 'FAIL'} {result['case']}{note}")
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(small=args.small)
    name = "faults-small" if args.small else "faults"
    write_results(name, results, markdown(results), args.out_dir, indent=1)
    for key in ("kill_points", "corruptions", "bad_inputs"):
        _say(f"{key}: {json.dumps(results[key])}")
    _say(f"repro: {json.dumps(results['repro'])}")
    _say(f"lost (kill points): {results['lost']}; repro cases that lost outputs: {results['repro']['lost']}")


if __name__ == "__main__":
    main()
