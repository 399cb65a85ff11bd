"""Fault points: named places where a test or the fault harness (bench/faults) takes a process down on purpose.

Stages and the atomic writers call `fault_point` at a few places; it does nothing unless the
environment variable FLASH_GRPO_FAULT names that place, so the tests can stop a stage exactly
there instead of guessing with timers. Standard library only: the artifact writers call it, and
stages/runtime/common.py re-exports it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

FAULT_ENV = "FLASH_GRPO_FAULT"  # `<point>[@<rank>][:<file name>][:hang]` (see fault_point)


def fault_point(name: str, rank: int | None = None, file: str | None = None) -> None:
    """When FLASH_GRPO_FAULT names this point: kill this process with SIGKILL there, or with `:hang`
    print one line to stderr (`fault: hanging at <point> ...`) and stop there for good.

    FLASH_GRPO_FAULT=`<point>[@<rank>][:<file name>][:hang]`, e.g. `started@1`, `renamed:manifest.json`,
    `written:shard-000001.tar:hang`. `@<rank>` picks one rank (default: any; `rank` defaults to the
    RANK variable, 0 without it), `<file name>` one output by its base name (only the writers' points
    have one). The points:
      started    a stage process starts, before any work (stages/runtime/common.py `run`; with the warm
                 runner first in the process DVC started, then in the runner's forked child)
      joined     a rank has joined the process group (stages/runtime/common.py)
      written    an output is complete under its temporary name, before the rename (the atomic
                 writers: flash_grpo_core/artifacts/atomic.py, tar_io.py); `file`: the output's name
      renamed    right after that rename, before the stage writes anything else
      finished   the stage's outputs are in place, just before its process exits (stages/runtime/common.py
                 `finish`): what DVC has not yet recorded in dvc.lock
    Unset, a call costs one environment look-up."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    wanted, *rest = spec.split(":")
    hang = bool(rest) and rest[-1] == "hang"
    wanted_file = (rest[:-1] if hang else rest) or [None]
    point, _, at_rank = wanted.partition("@")
    if point != name or (wanted_file[0] is not None and wanted_file[0] != file):
        return
    if at_rank and int(at_rank) != (int(os.environ.get("RANK", "0")) if rank is None else rank):
        return
    if hang:
        print(f"fault: hanging at {name}{' ' + file if file else ''} (pid {os.getpid()})", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
