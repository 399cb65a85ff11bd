"""Bad inputs through `dvc repro` on a finished workspace, as a user meets them (bench/faults/run.py).

The bad-input set of bench/faults/inputs.py runs each stage directly with its outputs moved aside;
it cannot see what DVC does around a stage that refuses its input. Here every case starts from the
finished reference run (`Workspace.restore`: runs/ and dvc.lock put back, the project's files back
to their committed state), applies one bad edit (bench/faults/repro_cases.py: a params override or
an edit of a prompt file, model folder or output) and runs `dvc repro` as a user would. Recorded:
DVC's exit code, the exit code of the stage that failed (DVC's "exited with N"; none when DVC
itself refused before running a stage), the first stderr line that carries the message, and which
outputs of dvc.lock (every one, `cache: false` metrics and plots included, by its md5) are no longer
in place with their bytes: `lost`. DVC removes a stage's outputs before running its command, so a
stage refusing its params has already cost its finished outputs unless something ran first.

Expectations per case (`expect`):
- `refused`: a stage exits with code 2 and the first line names the key or file;
- `dvc`: DVC itself refuses before any stage (params.yaml unreadable for dvc.yaml's interpolation),
  its first line naming the file or key;
- `warned`: the run succeeds (exit 0) and a warning line names the key (a base key the preset
  shadows: legal, but the edit has no effect);
- `repaired`: the run succeeds and reruns (or restores from its run cache) the stage that wrote a
  damaged output (DVC's hash sees it).
Every case also expects nothing lost. A case passes when all of its expectations hold.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.faults.workspace import BIN, Result, Workspace, run_command
from flash_grpo_core.pipeline.lock_outputs import changed_outputs, locked_outputs

MESSAGE_LINE = re.compile(r"(: error:|^ERROR:)")
STAGE_EXIT = re.compile(r"failed to reproduce '([^']+)'.*exited with (-?\d+)")
EXPECTATIONS = ("refused", "dvc", "warned", "repaired")
DELETE = object()  # a `params` value: remove the key


@dataclass(frozen=True)
class ReproCase:
    name: str  # what is wrong
    category: str
    expect: str  # one of EXPECTATIONS
    names: str  # what the message line must contain (`repaired`: the output must name the rerun stage)
    params: dict | None = None  # dotted keys set in the workspace's params.yaml (a value of DELETE: removed)
    edit: Callable[[Path], None] | None = None  # an edit of the project's files, given the project folder


def set_params(path: Path, overrides: dict) -> None:
    """Set dotted keys in a params file, comments kept; a value of `DELETE` removes the key."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    with open(path, "w") as handle:
        yaml.dump(data, handle)


def reset_project(workspace: Workspace) -> None:
    """The project's files as committed (edits and new files gone), then the reference runs/ and dvc.lock."""
    for command in (["checkout", "-q", "--", "."], ["clean", "-fdq"]):
        subprocess.run(["git", *command], cwd=workspace.project, check=True, capture_output=True)
    workspace.restore()


def message_line(result: Result, expect: str, names: str) -> str:
    """The line a user reads: for `warned`, the warning line that names `names` (else the first
    warning); else the first stderr line that carries an error (the failing stage's
    `<stage>: error: ...`, or DVC's `ERROR: ...`), else the first one. Warnings before an error
    (the validate stage's, of preset-shadowed keys) are not the message."""
    if expect == "warned":
        warnings = [line for line in (result.stderr + "\n" + result.stdout).splitlines() if "warning" in line.lower()]
        return next((line for line in warnings if names in line), warnings[0] if warnings else "")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return next((line for line in lines if MESSAGE_LINE.search(line)), lines[0] if lines else "")


def _excerpt(line: str, names: str, width: int = 300) -> str:
    """`line` cut to `width` characters around where it names `names` (a warning may list many keys)."""
    at = line.find(names)
    if len(line) <= width or at < width - len(names) - 20:
        return line[:width]
    start = max(0, at - width // 2)
    return "..." + line[start:start + width]


def stage_last_line(result: Result) -> str:
    """The last stderr line before DVC's own `ERROR:` lines: after a traceback, the stage's exception."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("ERROR:")]
    return lines[-1] if lines else ""


def run_repro_case(workspace: Workspace, case: ReproCase, timeout: float = 300) -> dict:
    """Apply the case to the finished workspace, `dvc repro`, and record what happened."""
    reset_project(workspace)
    outs = locked_outputs(workspace.reference_lock)
    if case.params is not None:
        set_params(workspace.project / "params.yaml", case.params)
    if case.edit is not None:
        case.edit(workspace.project)
    try:
        result = run_command([str(BIN / "dvc"), *workspace.repro_args()], workspace.project, workspace.env(True),
                             timeout=timeout)
        orphans = workspace.reap()
        lost = changed_outputs(workspace.project, outs)
    finally:
        reset_project(workspace)
    failed = STAGE_EXIT.search(result.stderr)
    ran = re.findall(r"Running stage '([^']+)'", result.stdout)
    line = workspace.scrub(message_line(result, case.expect, case.names))
    record = {"case": case.name, "category": case.category, "expect": case.expect, "names": case.names,
              "dvc_exit": result.code, "failed_stage": failed.group(1) if failed else None,
              "stage_exit": int(failed.group(2)) if failed else None, "ran": ran, "first_line": _excerpt(line, case.names),
              "named": case.names in line,
              "traceback": "Traceback" in result.stderr,
              "stage_last_line": workspace.scrub(stage_last_line(result))[:300],
              "lost": [f"{path} ({state})" for path, state in lost.items()],
              "orphans": len(orphans), "seconds": round(result.seconds, 1)}
    ok = passed(record, result)
    stage = f", {record['failed_stage']} exit {record['stage_exit']}" if record["failed_stage"] else ""
    return {**record, "passed": ok, "note": "" if ok else f"dvc exit {result.code}{stage}, lost {len(lost)}"}


def passed(record: dict, result: Result) -> bool:
    """Whether the case met its expectation (module docstring) and lost nothing."""
    expect, named = record["expect"], record["named"]
    if record["lost"] or record["traceback"] or record["orphans"]:
        return False
    if expect == "refused":
        return record["stage_exit"] == 2 and named
    if expect == "dvc":
        return record["dvc_exit"] != 0 and not record["ran"] and named
    if expect == "warned":
        return record["dvc_exit"] == 0 and named
    return record["dvc_exit"] == 0 and record["names"] in result.stdout  # repaired: the stage reran


def summary(cases: list[dict]) -> dict:
    lost = [case for case in cases if case["lost"]]
    return {"tried": len(cases), "passed": sum(case["passed"] for case in cases),
            "exit2_named": sum(case["stage_exit"] == 2 and case["named"] for case in cases),
            "lost": len(lost), "lost_outputs": sum(len(case["lost"]) for case in lost),
            "lost_cases": [case["case"] for case in lost],
            "by_expectation": {kind: sum(case["expect"] == kind for case in cases) for kind in EXPECTATIONS
                               if any(case["expect"] == kind for case in cases)}}

