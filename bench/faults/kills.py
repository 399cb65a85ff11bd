"""Kill points of bench/faults/run.py: a stage interrupted at an exact place, then `dvc repro`.

Each case starts from the reference state with the dvc.lock entries of the stages it runs removed
(their first run: DVC has nothing recorded for them) and runs `dvc repro --force --single-item
<stage>` (or `--downstream`) with FLASH_GRPO_FAULT naming a fault point (flash_grpo_core/artifacts/faults.py):
- `written:<file>`: the output is complete under its temporary name, before the rename;
- `renamed:<file>`: right after the rename, before the stage's next output;
- `finished`: every output in place, before the process exits and DVC updates dvc.lock;
- no point (timed): during the stage's compute, when a file shows up or after a delay.
The interruption is one of:
- `stage`: SIGKILL of the stage (the fault point kills its own process: the warm runner's forked
  child when the stage runs warm; timed: every stage process then running);
- `dvc`: SIGKILL of the `dvc` process alone, the stage held at the point (`:hang`): the stage's
  watchdog must end it;
- `ctrl-c`: SIGINT to dvc's process group while the stage is held at the point, as a terminal sends it.
Every process still running in the project after 15 s is an orphan (recorded, then killed). Then
`dvc repro --no-run-cache` resumes: as after an interrupted first run, where DVC's run cache has no
entry to restore the stage from, so the stage itself reruns. Every file under runs/ is compared
with the reference run (bytes; timings left out; an extra file is debris), and dvc.lock too.
`lost` counts the files of finished stages (all but the one running at the kill) that the
interruption damaged, and every file still wrong after the resume.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass

from bench.faults.workspace import Workspace, read_lock


@dataclass(frozen=True)
class KillCase:
    stage: str
    point: str | None  # FLASH_GRPO_FAULT without `:hang`; None: a timed kill during compute
    interrupt: str  # stage | dvc | ctrl-c
    warm: bool
    downstream: bool = False  # `dvc repro --force --downstream <stage>`: several stages, one killed
    appears: str | None = None  # timed: kill when this file (relative to the project) appears ...
    delay: float = 0.0  # ... or this many seconds after the stage started

    @property
    def place(self) -> str:
        if self.point is None:
            return "during compute (timed)"
        point = self.point.split(":")[0]
        return {"written": "between write and rename", "renamed": "after the rename, before the next output",
                "finished": "after the stage, before dvc.lock", "started": "at the stage's start"}[point]

    @property
    def name(self) -> str:
        where = self.point or (f"when {self.appears.rsplit('/', 1)[-1]} appears" if self.appears
                               else f"{self.delay:g} s in")
        chain = " --downstream" if self.downstream else ""
        return f"{self.stage}{chain} @ {where}: {self.interrupt}, {'warm' if self.warm else 'cold'}"


IT1 = "runs/tiny/it1"
FULL = [
    KillCase("validate", "renamed:sources.json", "stage", False),  # its outputs persist: nothing to lose
    KillCase("curate", "written:train.parquet", "stage", False),
    KillCase("curate", "renamed:train.parquet", "ctrl-c", True),
    KillCase("curate", "renamed:eval.parquet", "dvc", False),
    KillCase("init", "written:checkpoint", "dvc", False),
    KillCase("init", "renamed:checkpoint", "stage", True),
    KillCase("rollout@1", "started", "stage", False),
    KillCase("rollout@1", None, "stage", False, appears=f"{IT1}/rollout/prompt_embeds.safetensors"),
    KillCase("rollout@1", None, "ctrl-c", True, appears=f"{IT1}/rollout/prompt_embeds.safetensors"),
    KillCase("rollout@1", "written:shard-000001.tar", "stage", True),
    KillCase("rollout@1", "renamed:shard-000000.tar", "dvc", True),
    KillCase("rollout@1", "written:shards.json", "ctrl-c", False),
    KillCase("rollout@1", "renamed:shards.json", "stage", False),
    KillCase("rollout@2", "finished", "dvc", True),
    KillCase("score@1", "written:scores.parquet", "stage", False),
    KillCase("score@1", "renamed:scores.parquet", "ctrl-c", True),
    KillCase("score@2", "renamed:score.json", "dvc", True),
    KillCase("update@1", None, "dvc", False, delay=4.0),
    KillCase("update@1", "written:checkpoint", "stage", True),
    KillCase("update@1", "renamed:checkpoint", "stage", False),
    KillCase("update@2", "finished", "dvc", False),
    KillCase("eval_checkpoint@0", "written:videos.safetensors", "stage", True),
    KillCase("eval_checkpoint@1", "renamed:videos.safetensors", "dvc", False),
    KillCase("eval_checkpoint@2", None, "stage", True, delay=0.4),
    KillCase("evaluate", "written:report.html", "stage", False),
    KillCase("evaluate", "renamed:curves", "ctrl-c", True),
    KillCase("evaluate", "finished", "dvc", True),
    KillCase("export", "written:export", "stage", True),
    KillCase("export", "renamed:export", "ctrl-c", False),
    KillCase("export", "finished", "dvc", False),
    KillCase("update@2", "renamed:report.html", "stage", True, downstream=True),
    KillCase("score@2", "renamed:export", "dvc", True, downstream=True),
]
SMALL = [
    KillCase("rollout@1", "written:shard-000001.tar", "stage", True),
    KillCase("curate", "finished", "ctrl-c", False),  # SIGKILL of dvc: tests/test_watchdog.py, test_pipeline.py
]
HANG_LINE = "fault: hanging at"
WAIT_SECONDS = 240


def run_kill(workspace: Workspace, case: KillCase) -> dict:
    """Interrupt, resume, compare; one record of what happened (see the module docstring)."""
    stages = workspace.downstream(case.stage) if case.downstream else [case.stage]
    workspace.restore(drop=tuple(stages))
    fault = {} if case.point is None else {
        "FLASH_GRPO_FAULT": case.point if case.interrupt == "stage" else f"{case.point}:hang"}
    log = workspace.scratch / "kill.log"
    chain = "--downstream" if case.downstream else "--single-item"
    dvc = workspace.start_dvc(["repro", "--force", chain, case.stage], log, case.warm, **fault)
    fired = _interrupt(workspace, case, dvc, log)
    try:
        dvc.wait(timeout=60)
        dvc_ended = True
    except subprocess.TimeoutExpired:  # a dvc that outlives Ctrl-C: recorded, then killed
        dvc_ended = False
        os.killpg(dvc.pid, signal.SIGKILL)
        dvc.wait()
    orphans = workspace.reap()
    text = log.read_text()
    running = (re.findall(r"Running stage '([^']+)'", text) or [case.stage])[-1]
    after_kill = workspace.compare()
    damaged = [path for path in after_kill["missing"] + after_kill["changed"] if workspace.producer(path) != running]
    unrecorded = sorted(set(workspace.outputs) - set(read_lock(workspace.project / "dvc.lock")))
    written = [path for path in workspace.reference_hashes if workspace.producer(path) == running
               and path not in after_kill["missing"] + after_kill["changed"]]
    resume = workspace.dvc(*workspace.repro_args(), "--no-run-cache", warm=case.warm)
    final = workspace.compare()
    status = workspace.status()
    lock_equal = workspace.lock_equal()
    wrong = final["missing"] + final["changed"] + final["extra"]
    lost = sorted(set(damaged) | set(final["missing"] + final["changed"]))
    equal = fired and resume.code == 0 and not wrong and not status and lock_equal
    return {"case": case.name, "stage": case.stage, "interrupted_stage": running, "place": case.place,
            "interrupt": case.interrupt, "warm": case.warm, "fault": fault.get("FLASH_GRPO_FAULT"),
            "fired": fired, "dvc_exited_after_interrupt": dvc_ended, "orphans": len(orphans),
            "after_kill": {key: len(value) for key, value in after_kill.items()},
            "outputs_in_place_at_kill": len(written), "unrecorded_after_kill": unrecorded,
            "finished_outputs_damaged": damaged,
            "resume_exit": resume.code, "resume_seconds": round(resume.seconds, 1),
            "wrong_after_resume": wrong, "status_clean": not status, "lock_equal": lock_equal,
            "lost": lost, "resumed_equal": equal,
            "note": workspace.scrub(_failure_note(fired, resume, wrong, status, lock_equal, orphans, damaged))}


def _interrupt(workspace: Workspace, case: KillCase, dvc, log) -> bool:
    """Deliver the case's interruption; whether it hit the stage where the case meant it to."""
    if case.point is not None and case.interrupt == "stage":
        try:
            dvc.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            return False
        return bool(re.search(r"exited with (137|-9)\b", log.read_text()))
    if case.point is not None:
        if not _wait_until(lambda: HANG_LINE in log.read_text(), dvc):
            return False
    elif not _wait_timed(workspace, case, dvc, log):
        return False
    targets = {"dvc": [(dvc.pid, signal.SIGKILL)], "ctrl-c": [(-dvc.pid, signal.SIGINT)],  # -pid: the group
               "stage": [(pid, signal.SIGKILL) for pid in workspace.stage_processes()]}[case.interrupt]
    for pid, signum in targets:
        with contextlib.suppress(ProcessLookupError):  # ended on its own meanwhile
            os.kill(pid, signum)
    return bool(targets)


def _wait_timed(workspace: Workspace, case: KillCase, dvc, log) -> bool:
    started = f"Running stage '{case.stage}'"
    if not _wait_until(lambda: started in log.read_text(), dvc):
        return False
    if case.appears:
        return _wait_until((workspace.project / case.appears).exists, dvc, step=0.005)
    time.sleep(case.delay)
    return dvc.poll() is None


def _wait_until(condition, dvc, step: float = 0.05) -> bool:
    """Poll `condition` while dvc runs; False when dvc ended first or after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return True
        if dvc.poll() is not None:
            return condition()
        time.sleep(step)
    return False


def _failure_note(fired, resume, wrong, status, lock_equal, orphans, damaged) -> str:
    notes = [] if fired else ["the fault did not fire where meant (the stage ran past it)"]
    if resume.code:
        notes.append(f"resume exit {resume.code}: {(resume.stderr.strip().splitlines() or [''])[-1][:200]}")
    if wrong:
        notes.append(f"{len(wrong)} file(s) differ from the reference: {', '.join(wrong[:4])}")
    if status:
        notes.append(f"dvc status not clean: {sorted(status)}")
    if not lock_equal:
        notes.append("dvc.lock differs from the reference")
    if orphans:
        notes.append(f"{len(orphans)} process(es) outlived the interruption")
    if damaged:
        notes.append(f"the interruption damaged outputs of finished stages: {', '.join(damaged[:4])}")
    return "; ".join(notes)
