"""The flows' one subprocess boundary: `dvc repro <stage>` in the project, its output streamed line by line.

DVC decides whether a stage runs: an up-to-date stage is skipped, one whose inputs match an
earlier run is restored from the run cache, anything else runs. This module only starts `dvc`,
relays its lines, reads what happened from them, and classifies failures:

- the stage command exited 2: a known, deterministic input error (config, missing model path,
  corrupt shard, NaN; see `stages/runtime/common.py`): `StageError`, never retried;
- anything else (another exit code, a signal, DVC failing before the command, e.g. on its lock):
  `TransientStageError`, which the flow retries a bounded number of times.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flash_grpo_core.pipeline.workspace import tool_env  # telemetry off, this environment's tools first

DETERMINISTIC_EXIT = 2  # stages/runtime/common.py: known input errors

_RAN = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run")
_FAILED = re.compile(r"failed to reproduce '([^']+)'.*exited with (-?\d+)")
# DVC's advice to a person at a terminal; noise in a run's log
_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
          "Use `dvc push`")


class StageError(RuntimeError):
    """A stage failed on a known input error (exit code 2): retrying cannot help."""


class TransientStageError(RuntimeError):
    """A stage or DVC failed in a way that may pass on a second try (I/O, a timeout, a killed process)."""


@dataclass(frozen=True)
class StageRun:
    """What one `dvc repro <stage>` did: which stages ran, were skipped or restored, and how long it took."""

    stage: str
    seconds: float
    ran: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()
    lines: list[str] = field(default_factory=list, repr=False)

    @property
    def did_work(self) -> bool:
        return bool(self.ran)


def worth_logging(line: str) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith(_HINTS)


def spawn(args: list[str], cwd: Path, on_line: Callable[[str], None]) -> int:
    """Run `args` in `cwd`, passing each output line (stdout and stderr merged) to `on_line`; the exit code.

    The child stays in this process group, so cancelling the flow run stops the stage too.
    """
    process = subprocess.Popen(args, cwd=cwd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, errors="replace")
    try:
        for line in process.stdout:
            on_line(line.rstrip("\n"))
        return process.wait()
    finally:
        if process.poll() is None:  # interrupted while reading: do not leave the stage running
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        process.stdout.close()


def repro(stage: str, project: Path, on_line: Callable[[str], None] = lambda line: None,
          allow_missing: bool = False) -> StageRun:
    """`dvc repro <stage>` (upstream stages are checked, and skipped when up to date); raises on failure.
    `allow_missing`: skip stages whose only change is missing data (checkpoints removed by
    flash_grpo_core.pipeline.prune)."""
    dvc = str(Path(sys.executable).parent / "dvc")
    lines: list[str] = []

    def relay(line: str) -> None:
        lines.append(line)
        on_line(line)

    began = time.perf_counter()
    code = spawn([dvc, "repro", *(["--allow-missing"] if allow_missing else []), stage], project, relay)
    seconds = round(time.perf_counter() - began, 2)
    if code != 0:
        raise _failure(stage, code, lines)

    def matching(pattern: re.Pattern) -> tuple[str, ...]:
        return tuple(match.group(1) for line in lines if (match := pattern.match(line.strip())))

    return StageRun(stage, seconds, matching(_RAN), matching(_SKIPPED), matching(_RESTORED), lines)


def _failure(stage: str, code: int, lines: list[str]) -> RuntimeError:
    """The error for a failed `dvc repro`: the stage's own message when it gave one."""
    failed = next((match for line in reversed(lines) if (match := _FAILED.search(line))), None)
    if failed is None:  # DVC itself failed (lock held, I/O): the stage never ran
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        return TransientStageError(f"dvc repro {stage} failed with exit code {code}: {last}")
    culprit, exit_code = failed.group(1), int(failed.group(2))
    message = _stage_message(culprit, lines)
    if exit_code == DETERMINISTIC_EXIT:
        return StageError(f"stage {culprit} failed on its input (exit 2): {message}")
    return TransientStageError(f"stage {culprit} failed with exit code {exit_code}: {message}")


def _stage_message(culprit: str, lines: list[str]) -> str:
    """The stage's one-line error (`<name>: error: ...`), else the last line before DVC's ERROR."""
    name = culprit.split("@")[0]
    for line in reversed(lines):
        if line.startswith(f"{name}: error:"):
            return line
    body = [line for line in lines if line.strip() and not line.startswith("ERROR:")]
    return body[-1] if body else "no output"
