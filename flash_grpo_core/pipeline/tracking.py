"""Live experiment tracking: a run's numbers and sample videos as they are made, TensorBoard by default.

One logical run spans every stage process, iteration and resume: its folder `<dir>/<run_name>`
(params.yaml's `tracking:`; by default `<pipeline.root>/<preset>/tracking/<preset>`) is TensorBoard's
log dir, fixed per run, so each process adds an event file to the same run, and `run.json` there
holds the run's id, created by the first process that logs and read by every later one. The step is
the iteration. `logged.jsonl` there lists what was logged ((tag, step) and the value or the video's
digest): a stage that is rerun (forced, or after an interruption) with the same result adds nothing,
so a curve holds one point a step.

Only rank 0 logs; other ranks create nothing. A backend that fails (not installed, raising) warns
once on stderr and is dropped; the stage goes on. Imports are lazy: opening a tracker costs nothing
until the first value is logged. W&B and MLflow would be backends beside `TensorBoard` below.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

RUN_FILE = "run.json"  # {"run_id", "run_name", "project"}: created once, then reused
LEDGER_FILE = "logged.jsonl"  # one {"tag", "step", "value"} a line: what the run holds already
FRAME_LIMIT = 16  # frames of a sample shown in a frame grid when no video encoder is installed


@dataclass(frozen=True)
class RunSpec:
    """Where and how a run is tracked: params.yaml's `tracking:` resolved for a preset."""

    log_dir: Path
    run_name: str
    project: str = "flash-grpo"
    backends: tuple[str, ...] = ("tensorboard",)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_spec(params) -> RunSpec:
    """The run of `params`: `tracking.dir` (default `<pipeline.root>/<preset>/tracking`) / run name."""
    tracking = params.tracking
    base = Path(tracking.dir) if tracking.dir else Path(params.pipeline.root) / params.preset / "tracking"
    name = tracking.run_name or params.preset
    return RunSpec(base / name, name, tracking.project, tuple(tracking.backends), dict(tracking.options))


def run_id(spec: RunSpec) -> str:
    """The run's id from `run.json` in its log dir; the first caller creates it (exclusively)."""
    path = spec.log_dir / RUN_FILE
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    record = {"run_id": uuid.uuid4().hex, "run_name": spec.run_name, "project": spec.project}
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        return record["run_id"]
    except FileExistsError:
        return str(json.loads(path.read_text(encoding="utf-8"))["run_id"])


def process_rank() -> int:
    """This process's rank: the process group's when one is set up, else torchrun's RANK, else 0."""
    if "torch.distributed" in sys.modules:
        from flash_grpo_core.engine.distributed import current

        world = current()
        if world.distributed:
            return world.rank
    return int(os.environ.get("RANK", "0") or 0)


class TensorBoard:
    """The `tensorboard` backend: torch.utils.tensorboard's SummaryWriter on the run's log dir."""

    name = "tensorboard"

    def __init__(self, spec: RunSpec):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(spec.log_dir), **spec.options.get(self.name, {}))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # an iteration's numbers are on disk, for a live TensorBoard, when the call returns

    def video(self, tag: str, video, step: int, fps: int) -> None:
        """`video` uint8 [T, H, W, 3]: a video where moviepy can encode it, else a frame grid image."""
        import torch

        frames = torch.as_tensor(video)
        if video_encoder_available():
            self.writer.add_video(tag, frames.permute(0, 3, 1, 2)[None], global_step=step, fps=fps)  # [1, T, C, H, W]
            self.writer.flush()
            return
        chosen = frames[:: max(1, math.ceil(len(frames) / FRAME_LIMIT))]
        grid = torch.cat(list(chosen), dim=1)  # [H, T' * W, 3]: the frames left to right
        self.writer.add_image(f"{tag}_frames", grid, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


BACKENDS = {TensorBoard.name: TensorBoard}  # the names tracking.backends may hold (config/monitoring.py)


def video_encoder_available() -> bool:
    """Whether SummaryWriter.add_video can encode a GIF here (it needs moviepy's `editor`, moviepy < 2)."""
    try:
        import moviepy.editor  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or moviepy 2 (no `editor`), or its own imports missing
        return False
    return True


class Tracker:
    """Logs to the run's backends from rank 0; see the module docstring. Use as a context manager."""

    def __init__(self, spec: RunSpec, rank: int | None = None, backends: Mapping[str, type] | None = None):
        self.spec = spec
        self.active = bool(spec.backends) and (process_rank() if rank is None else rank) == 0
        self._classes = dict(BACKENDS if backends is None else backends)
        self._open: dict[str, Any] | None = None  # opened on the first value
        self._logged: dict[tuple[str, int], Any] = {}
        self.run_id: str | None = None
        self._warned: set[str] = set()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Every finite number of `values` (nested mappings as `a/b`) under `prefix/`, at `step`."""
        flat = {f"{prefix}/{key}" if prefix else key: float(value) for key, value in _numbers(values)}
        new = {tag: value for tag, value in flat.items() if self._is_new(tag, step, value)}
        if new and self._backends():
            self._record([(tag, step, value) for tag, value in new.items()],
                         lambda backend: backend.scalars(new, step))

    def log_video(self, tag: str, video, step: int, fps: int = 4) -> None:
        """One sample video, uint8 [T, H, W, 3] (a tensor or an array), at `step`."""
        if not self.active:
            return
        import numpy as np

        try:
            if hasattr(video, "detach"):  # a tensor, on a GPU too
                video = video.detach().cpu().numpy()
            array = np.ascontiguousarray(np.asarray(video, dtype=np.uint8))
        except (TypeError, ValueError, RuntimeError) as error:
            self._warn("tracking", error)
            return
        digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
        if self._is_new(tag, step, digest) and self._backends():
            self._record([(tag, step, digest)], lambda backend: backend.video(tag, array, step, fps))

    def close(self) -> None:
        for name, backend in list((self._open or {}).items()):
            self._call(name, lambda b: b.close())
        self._open = {} if self._open is not None else None

    def _is_new(self, tag: str, step: int, value) -> bool:
        if not self.active:
            return False
        self._backends()
        return self._logged.get((tag, step)) != value

    def _backends(self) -> dict[str, Any]:
        """The open backends; the first call reads the run id and the ledger and opens them."""
        if self._open is None and self.active:
            self._open = {}
            try:
                self.run_id = run_id(self.spec)
                self._logged = _read_ledger(self.spec.log_dir / LEDGER_FILE)
            except (OSError, ValueError, KeyError) as error:
                self._warn("tracking", error)
                self.active = False
                return {}
            for name in self.spec.backends:
                try:
                    self._open[name] = self._classes[name](self.spec)
                except Exception as error:  # noqa: BLE001 - not installed, a bad option: the stage goes on
                    self._warn(name, error)
        return self._open or {}

    def _record(self, entries: list[tuple[str, int, Any]], call) -> None:
        if any([self._call(name, call) for name in list(self._open)]):  # every backend, then the ledger
            self._logged.update({(tag, step): value for tag, step, value in entries})
            try:
                with open(self.spec.log_dir / LEDGER_FILE, "a", encoding="utf-8") as ledger:
                    ledger.write("".join(json.dumps({"tag": t, "step": s, "value": v}) + "\n" for t, s, v in entries))
            except OSError as error:
                self._warn("tracking", error)

    def _warn(self, name: str, error: BaseException) -> None:
        if name not in self._warned:  # once a backend (or the run's files) per process
            self._warned.add(name)
            _warning(name, error)

    def _call(self, name: str, call) -> bool:
        """Whether `call(backend)` succeeded; a failing backend warns once and is dropped."""
        try:
            call(self._open[name])
            return True
        except Exception as error:  # noqa: BLE001 - tracking never stops a stage
            self._warn(name, error)
            self._open.pop(name, None)
            return False


def cost(timings: Mapping[str, float], videos: int, world_size: int, seconds_key: str) -> dict[str, float]:
    """A stage's cost for its tracker: its timings (seconds), videos per second per rank over
    `seconds_key`, and this process's peak memory in GB (the GPU's when there is one, else the
    resident set)."""
    import resource

    numbers = {key: float(value) for key, value in timings.items()}
    if numbers.get(seconds_key):
        numbers["videos_per_second_per_rank"] = videos / world_size / numbers[seconds_key]
    torch = sys.modules.get("torch")  # the stage imported it; no import here
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        numbers["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        numbers["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    return numbers


def open_tracker(params, rank: int | None = None) -> Tracker:
    """The tracker of `params`' run (params.yaml's `tracking:`), logging from rank 0 only."""
    return Tracker(run_spec(params), rank)


def _numbers(values: Mapping[str, Any], prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and math.isfinite(value):
            yield f"{prefix}{key}", value


def _read_ledger(path: Path) -> dict[tuple[str, int], Any]:
    logged = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                logged[(entry["tag"], int(entry["step"]))] = entry["value"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed process: that value is logged again
    return logged


def _warning(name: str, error: BaseException) -> None:
    print(f"warning: tracking: {name} disabled ({type(error).__name__}: {error}); the stage goes on without it",
          file=sys.stderr, flush=True)
