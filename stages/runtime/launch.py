"""Start a stage on several processes: the world size comes from the environment, never from dvc.yaml.

DVC reruns a stage whose command changes, so `dvc.yaml` runs `python -m stages.<name> ...` for every
world size and the stage decides here, from its environment, whether to run in this process or to
start itself again under torchrun:

    FLASH_GRPO_NPROC_PER_NODE   processes per node (default 1: run in this process)
    FLASH_GRPO_NNODES           nodes (default 1: `torchrun --standalone`)
    FLASH_GRPO_NODE_LAUNCHER    with several nodes: the command that starts one copy of what follows
                                on every node of the allocation, e.g. `srun --ntasks-per-node=1`
                                (Slurm) or an `mpirun --hostfile ... --map-by ppr:1:node` line
    FLASH_GRPO_RDZV_ENDPOINT    with several nodes: host:port of the c10d rendezvous (default: this
                                host's name, port 29400); every node must reach it
    FLASH_GRPO_DIST_TIMEOUT     seconds a collective waits for a peer before the stage fails (1800)

torchrun stops every rank when one fails, so a dead rank fails the stage instead of hanging it.
Each rank leaves its exit code in a status folder under the working directory (a shared file
system on a cluster), so the stage exits as its worst rank did: 2 for a known input error, 75 for
an unreachable reward server, as a single process would.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

NPROC_ENV, NNODES_ENV = "FLASH_GRPO_NPROC_PER_NODE", "FLASH_GRPO_NNODES"
NODE_LAUNCHER_ENV, RDZV_ENV = "FLASH_GRPO_NODE_LAUNCHER", "FLASH_GRPO_RDZV_ENDPOINT"
STATUS_ENV = "FLASH_GRPO_RANK_STATUS"
STATUS_ROOT = ".flash_grpo_launch"  # in the working directory; ignored by git and DVC


class LaunchError(ValueError):
    """Launcher settings in the environment that cannot work."""


def _positive(name: str) -> int:
    raw = os.environ.get(name, "1").strip() or "1"
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r}: expected a whole number of at least 1") from None
    if value < 1:
        raise LaunchError(f"{name}={raw!r}: expected a whole number of at least 1")
    return value


def requested() -> tuple[int, int]:
    """(processes per node, nodes) asked for by the environment."""
    return _positive(NPROC_ENV), _positive(NNODES_ENV)


def inside() -> bool:
    """Whether this process is already one of torchrun's ranks."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def wanted() -> bool:
    """Whether this stage process should start torchrun instead of computing itself."""
    nproc, nnodes = requested()
    return not inside() and nproc * nnodes > 1


def torchrun_command(module: str, argv: list[str], nproc: int, nnodes: int) -> list[str]:
    """The command that runs `python -m <module> <argv>` on nproc x nnodes ranks."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    if nnodes == 1:
        return [*run, "--standalone", "-m", module, *argv]
    launcher = shlex.split(os.environ.get(NODE_LAUNCHER_ENV, ""))
    if not launcher:
        raise LaunchError(f"{NNODES_ENV}={nnodes} needs {NODE_LAUNCHER_ENV}: the command that starts one copy "
                          "per node, e.g. 'srun --ntasks-per-node=1' inside a Slurm allocation")
    endpoint = os.environ.get(RDZV_ENV) or f"{socket.getfqdn()}:29400"
    return [*launcher, *run, f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={uuid.uuid4().hex[:12]}", "-m", module, *argv]


def launch(module: str, argv: list[str]) -> int:
    """Run the stage under torchrun and return the exit code of its worst rank."""
    nproc, nnodes = requested()
    Path(STATUS_ROOT).mkdir(exist_ok=True)
    status = Path(tempfile.mkdtemp(prefix="ranks-", dir=STATUS_ROOT))
    try:
        command = torchrun_command(module, argv, nproc, nnodes)
        print(f"{module.removeprefix('stages.')}: starting {nproc * nnodes} processes ({nnodes} node(s) x {nproc})",
              file=sys.stderr, flush=True)
        from stages.runtime import watchdog

        torchrun = subprocess.Popen(command, env={**os.environ, STATUS_ENV: str(status.resolve())})
        watchdog.adopt(torchrun)  # stopped with this process's starter, ranks and all
        return worst_exit(status, torchrun.wait())
    finally:
        shutil.rmtree(status, ignore_errors=True)


def worst_exit(status: Path, launcher_code: int) -> int:
    """The stage's exit code from its ranks' codes: a known input error (2) over a transient one (75)
    over any other failure; torchrun's own code when no rank left one (it died before writing)."""
    codes = [code for path in sorted(status.glob("rank-*.json")) if (code := _recorded(path)) is not None]
    failed = [code for code in codes if code != 0]
    for meaningful in (2, 75):
        if meaningful in failed:
            return meaningful
    if failed:
        return failed[0]
    return launcher_code


def _recorded(path: Path) -> int | None:
    """A rank's recorded exit code; None when the file cannot be read as one."""
    try:
        return int(json.loads(path.read_text())["exit"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_exit(code: int) -> None:
    """Leave this rank's exit code for `launch` (no-op outside a launch). Written whole or not at
    all (a temporary file renamed): torchrun may kill a rank while it writes, once another failed."""
    folder = os.environ.get(STATUS_ENV)
    if folder and inside():
        path = Path(folder) / f"rank-{int(os.environ.get('RANK', '0')):05d}.json"
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"exit": int(code)}))
        os.replace(temporary, path)
