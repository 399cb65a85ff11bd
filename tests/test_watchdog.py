"""A stage whose `dvc repro` is killed ends too, with its torchrun and ranks (stages/runtime/watchdog.py).

A stand-in for DVC starts the stage the way DVC does (`$SHELL -c <cmd>` with DVC_STAGE set), the
stage is held at a fault point (FLASH_GRPO_FAULT=...:hang) and the stand-in is killed with
SIGKILL: every process of the stage must be gone within seconds, where before it ran on.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flash_grpo_core.pipeline.workspace import tool_env

ROOT = Path(__file__).resolve().parents[1]
FAKE_DVC = """
import os, subprocess, sys, time
subprocess.Popen(["/bin/sh", "-c", sys.argv[1]], env=dict(os.environ, DVC_STAGE="rollout@1"))
time.sleep(600)
"""
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="the watchdog reads /proc (Linux)")


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


ROLLOUT = "{python} -m stages.rollout --iteration 1 --prompts {token}.parquet --checkpoint {token} --out {token}"
CURATE = "{python} -m stages.curate --params params.yaml --sources prompts/toy.jsonl --out-dir {tmp}/{token}"


@pytest.mark.parametrize("command, nproc, fault, processes", [
    (ROLLOUT, "1", "started:hang", 1),
    (ROLLOUT, "2", "started@1:hang", 4),
    (CURATE, "1", "renamed:train.parquet:hang", 1),  # a CPU stage that is not distributed
])
def test_a_stage_ends_when_dvc_is_killed(command, nproc, fault, processes, tmp_path):
    token = f"watchdog-{uuid.uuid4().hex[:10]}"
    command = command.format(python=sys.executable, token=token, tmp=tmp_path)
    env = tool_env(FLASH_GRPO_FAULT=fault, FLASH_GRPO_NPROC_PER_NODE=nproc, FLASH_GRPO_WARM="0",
                   OMP_NUM_THREADS="1", FLASH_GRPO_DIST_TIMEOUT="120")
    dvc = subprocess.Popen([sys.executable, "-c", FAKE_DVC, command], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the launcher, torchrun and its ranks all carry the token in their arguments
        assert _wait_for(lambda: len(_processes_with(token)) >= processes, 60), _processes_with(token)
        time.sleep(1.0)  # the ranks' watchdogs are running by now (they start before the fault point)
        dvc.send_signal(signal.SIGKILL)
        dvc.wait()
        assert _wait_for(lambda: not _processes_with(token), 30), f"still running: {_processes_with(token)}"
    finally:
        for pid in _processes_with(token):
            os.kill(pid, signal.SIGKILL)
        if dvc.poll() is None:
            dvc.kill()
