"""A stage ends when the process that started it dies, instead of running on as an orphan.

`dvc repro` killed with SIGKILL leaves its stage running; a resumed `dvc repro` would then rerun
the stage while the orphan still writes the same outputs. So every stage process started by DVC
(DVC sets DVC_STAGE for its commands) or by torchrun watches the process that started it (DVC
itself, or the torchrun agent; the `sh -c` DVC wraps a command in is looked through), and when
that process is gone it stops its own children (a launcher's torchrun) and exits with code 1.
Linux only (/proc); elsewhere nothing is watched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "fish"}
POLL_SECONDS = 0.5
_children: list[subprocess.Popen] = []


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def starter() -> tuple[int, int] | None:
    """(pid, start time) of the process that started this one, looking through shells."""
    pid = os.getppid()
    for _ in range(4):
        stat = _stat(pid)
        if stat is None or pid <= 1:
            return None
        if os.path.basename(_name(pid)) not in SHELLS:
            return pid, stat[1]
        pid = stat[0]
    return None


def adopt(child: subprocess.Popen) -> None:
    """Stop `child` too when the watched process dies."""
    _children.append(child)


def start() -> None:
    """Watch the starter in a daemon thread, when DVC or torchrun started this process."""
    if not (os.environ.get("DVC_STAGE") or os.environ.get("TORCHELASTIC_RUN_ID")) or not Path("/proc").is_dir():
        return
    watched = starter()
    if watched is not None:
        threading.Thread(target=_watch, args=watched, name="stage-watchdog", daemon=True).start()


def _watch(pid: int, started: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_SECONDS):
        stat = _stat(pid)
        if stat is None or stat[1] != started:
            break
    print(f"stage: the process that started it (pid {pid}) is gone; stopping", file=sys.stderr, flush=True)
    for child in _children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # torchrun stops its ranks on SIGTERM
    for child in _children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
    os._exit(1)
