"""The scratch workspace of bench/faults/run.py: a git + DVC copy of the project on the tiny preset, its
uninterrupted reference run, and what every fault case needs around it.

- `Workspace.reference` runs `dvc repro` once and keeps a copy of `runs/` and of `dvc.lock`;
  `restore` puts both back (a copy of a few MB, no DVC call), so each case starts from the same
  state, optionally with some stages' lock entries removed (a first run of those stages).
- `compare` hashes every file under `runs/` against the reference (the untracked `*.timings.json`
  left out): missing, changed and extra files (an extra file is debris an interruption left).
- `stage_command` is a stage's command as DVC resolved it (dvc.lock), with its outputs moved to a
  scratch folder, so a stage can be run directly on an input without touching the workspace.
- Stages run warm (`python -m stages.runtime.warm` listening on a socket of this workspace) or cold
  (FLASH_GRPO_WARM=0); every process runs on one thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UNTRACKED_SUFFIX = ".timings.json"  # wall times: no DVC output, different on every run
# runs/<preset>/tracking: the live tracking's run (event files named by time and process): no DVC output
UNTRACKED_FOLDER = "tracking"


@dataclass
class Result:
    """A finished command: exit code, output, wall seconds."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def first_error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[0] if lines else ""

    @property
    def last_error_line(self) -> str:
        """The last line of stderr: after a traceback, the exception."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def run_command(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> Result:
    began = time.perf_counter()
    try:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        return Result(-1, str(expired.stdout or ""), f"timed out after {timeout} s", time.perf_counter() - began)
    return Result(done.returncode, done.stdout, done.stderr, time.perf_counter() - began)


def file_hashes(folder: Path) -> dict[str, str]:
    """{path relative to folder's parent: sha256} of every file under `folder`, timings and the tracking
    run (`<preset>/tracking`) left out."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.relative_to(folder).parts[1:2] == (UNTRACKED_FOLDER,):
            continue
        if path.is_file() and not path.name.endswith(UNTRACKED_SUFFIX):
            hashes[str(path.relative_to(folder.parent))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _inside(first: str, second: str) -> bool:
    """Whether one path is the other or lies inside it."""
    return first == second or first.startswith(second + "/") or second.startswith(first + "/")


def read_lock(path: Path) -> dict:
    from flash_grpo_core.config import read_yaml

    return read_yaml(path).get("stages", {})


class Workspace:
    """A scratch project copy, its warm runner and its reference run (see the module docstring)."""

    def __init__(self, scratch: Path, cache_dir: Path | None = None, target: str | None = None):
        from flash_grpo_core.pipeline.workspace import copy_project

        self.scratch, self.target = scratch, target  # target: the stage `dvc repro` ends at (None: all)
        self.project = copy_project(ROOT, scratch / "project", preset="tiny",
                                    cache_dir=cache_dir or scratch / "dvc-cache")
        self.sockets = Path(tempfile.mkdtemp(prefix="fgw-"))  # mode 0700, a short path for the socket
        self.server: subprocess.Popen | None = None
        self.reference_runs = scratch / "reference-runs"
        self.reference_lock_text = ""
        self.reference_lock: dict = {}
        self.reference_hashes: dict[str, str] = {}
        self.outputs: dict[str, list[str]] = {}  # stage: its output paths (dvc.lock)

    # -- processes ---------------------------------------------------------------------------

    def env(self, warm: bool, **extra: str) -> dict[str, str]:
        from flash_grpo_core.pipeline.workspace import tool_env

        return tool_env(OMP_NUM_THREADS="1", FLASH_GRPO_WARM_SOCKET=str(self.sockets / "warm.sock"),
                        FLASH_GRPO_WARM="1" if warm else "0", **extra)

    def start_warm(self) -> None:
        log = self.scratch / "warm.log"
        with open(log, "w") as handle:
            self.server = subprocess.Popen([sys.executable, "-m", "stages.runtime.warm"], cwd=self.project,
                                           env=self.env(True), stdout=handle, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = time.monotonic() + 180
        while "listening" not in log.read_text():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm runner did not start:\n{log.read_text()}")
            time.sleep(0.2)

    def warm_served(self) -> int:
        log = self.scratch / "warm.log"
        return log.read_text().count("warm: stages.") if log.exists() else 0

    def close(self) -> None:
        """Stop the warm runner (SIGKILL: no stage is running by now, and its graceful exit, a
        teardown of torch and diffusers, takes seconds) and remove its socket's folder."""
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        shutil.rmtree(self.sockets, ignore_errors=True)

    def project_processes(self) -> list[int]:
        """Live processes working in the project (stages, DVC), the warm runner left out."""
        skip = {os.getpid(), *([self.server.pid] if self.server else [])}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            try:
                alive = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
                if alive and os.readlink(entry / "cwd") == str(self.project):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stage_processes(self) -> list[int]:
        """The stage processes now running: a cold stage, or a warm stage's client and forked child."""
        found = []
        for pid in self.project_processes():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"-m\0stages." in command:
                found.append(pid)
        return found

    def reap(self, seconds: float = 15.0) -> list[int]:
        """Wait for every process of the project to end; the pids still alive after `seconds` (an
        orphaned stage that would race the resumed run) are killed and returned."""
        deadline = time.monotonic() + seconds
        while self.project_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = self.project_processes()
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return survivors

    # -- DVC -----------------------------------------------------------------------------------

    def dvc(self, *args: str, warm: bool = True, **extra: str) -> Result:
        return run_command([str(BIN / "dvc"), *args], self.project, self.env(warm, **extra))

    def start_dvc(self, args: list[str], log: Path, warm: bool, **extra: str) -> subprocess.Popen:
        """`dvc <args>` in the background, in a process group of its own (a terminal's Ctrl-C
        reaches the group), its output to `log`."""
        with open(log, "w") as handle:
            return subprocess.Popen([str(BIN / "dvc"), *args], cwd=self.project, env=self.env(warm, **extra),
                                    stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def repro_args(self) -> list[str]:
        return ["repro", *([self.target] if self.target else [])]

    def status(self, stage: str | None = None) -> dict:
        """`dvc status --json` of one stage, or of everything the reference run made; {} when up to date."""
        targets = [stage] if stage else (["--with-deps", self.target] if self.target else ["dvc.yaml"])
        result = self.dvc("status", "--json", *targets)
        try:
            return json.loads(result.stdout or "{}")
        except json.JSONDecodeError:
            return {"unreadable status": result.stdout + result.stderr}

    # -- the reference and restoring it ----------------------------------------------------------

    def reference(self) -> Result:
        result = self.dvc(*self.repro_args())
        if result.code:
            raise RuntimeError(f"the reference run failed:\n{result.stdout}\n{result.stderr}")
        shutil.copytree(self.project / "runs", self.reference_runs, symlinks=True)
        self.reference_lock_text = (self.project / "dvc.lock").read_text()
        self.reference_lock = read_lock(self.project / "dvc.lock")
        self.reference_hashes = file_hashes(self.project / "runs")
        self.outputs = {stage: [out["path"] for out in entry.get("outs", [])]
                        for stage, entry in self.reference_lock.items()}
        return result

    def restore(self, drop: tuple[str, ...] = ()) -> None:
        """The reference's runs/ and dvc.lock, without the lock entries of the stages in `drop`."""
        runs = self.project / "runs"
        if runs.exists():
            for path in runs.rglob("*"):  # a corrupted file may have lost its write permission
                path.chmod(0o755 if path.is_dir() else 0o644)
            shutil.rmtree(runs)
        shutil.copytree(self.reference_runs, runs, symlinks=True)
        if not drop:
            (self.project / "dvc.lock").write_text(self.reference_lock_text)
            return
        from ruamel.yaml import YAML

        yaml = YAML()
        lock = yaml.load(self.reference_lock_text)
        for stage in drop:
            del lock["stages"][stage]
        with open(self.project / "dvc.lock", "w") as handle:
            yaml.dump(lock, handle)

    def compare(self) -> dict[str, list[str]]:
        """Files under runs/ against the reference: missing, changed and extra ones."""
        now = file_hashes(self.project / "runs") if (self.project / "runs").exists() else {}
        reference = self.reference_hashes
        return {"missing": sorted(set(reference) - set(now)), "extra": sorted(set(now) - set(reference)),
                "changed": sorted(p for p in set(now) & set(reference) if now[p] != reference[p])}

    def scrub(self, text: str) -> str:
        """`text` without this machine's scratch paths: project paths made relative."""
        text = text.replace(f"{self.project}/", "").replace(str(self.project), ".")
        return text.replace(str(self.scratch), "<scratch>").replace(str(self.sockets), "<socket folder>")

    def lock_equal(self) -> bool:
        return read_lock(self.project / "dvc.lock") == self.reference_lock

    def producer(self, path: str) -> str | None:
        """The stage whose output holds the file `path` (relative to the project)."""
        for stage, outs in self.outputs.items():
            if any(path == out or path.startswith(out + "/") for out in outs):
                return stage
        return None

    def downstream(self, stage: str) -> list[str]:
        """`stage` and every stage that depends on its outputs, directly or not."""
        chosen, grew = [stage], True
        while grew:
            grew = False
            for name, entry in self.reference_lock.items():
                outs = [out for done in chosen for out in self.outputs[done]]
                if name not in chosen and any(_inside(dep["path"], out) for dep in entry.get("deps", [])
                                              for out in outs):
                    chosen.append(name)
                    grew = True
        return chosen

    # -- running a stage directly ----------------------------------------------------------------

    def stage_command(self, stage: str, replace: dict[str, str] | None = None) -> tuple[list[str], Path]:
        """The stage's command from the reference dvc.lock, its outputs (and timings) redirected to
        a fresh scratch folder, and the values of the flags in `replace` swapped (appended when the
        command has no such flag, e.g. curate's --sources); (argv, folder)."""
        out_dir = Path(tempfile.mkdtemp(prefix="out-", dir=self.scratch))
        argv = shlex.split(self.reference_lock[stage]["cmd"])
        outputs = set(self.outputs[stage])
        for index in range(1, len(argv)):
            flag, value = argv[index - 1], argv[index]
            if replace and flag in replace:
                argv[index] = replace[flag]
            elif value in outputs or value.endswith(UNTRACKED_SUFFIX) or flag == "--out-dir":
                argv[index] = str(out_dir / value)
        argv += [item for flag, value in (replace or {}).items() if flag not in argv for item in (flag, value)]
        return argv, out_dir

    def run_stage(self, stage: str, replace: dict[str, str] | None = None, warm: bool = True) -> tuple[Result, bool]:
        """Run the stage directly (`stage_command`); its result, and whether it wrote exactly the
        reference run's outputs (the same files, the same bytes)."""
        argv, out_dir = self.stage_command(stage, replace)
        try:
            result = run_command(argv, self.project, self.env(warm), timeout=300)
            written = file_hashes(out_dir / "runs") if (out_dir / "runs").is_dir() else {}
            expected = {path: digest for path, digest in self.reference_hashes.items() if self.producer(path) == stage}
            return result, written == expected
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
