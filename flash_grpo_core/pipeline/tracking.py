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
until the first value is logged.

Backends (`tracking.backends`): `tensorboard` (a dependency), `wandb` and `mlflow` (extras:
`pip install .[wandb]`, `.[mlflow]`), each through its library's own client. W&B resumes the run by
its id (`resume="allow"`) and plots every value against `iteration`, a logged key of its own, so a
later process may log an earlier step (an evaluation after an update); MLflow finds its run by the tag
`flash_grpo.run_id`, in a SQLite store inside the run's folder unless `options.mlflow.tracking_uri`
names another. Where each backend shows the run is written to `links.json` there (the Prefect flow
links it from the flow run's page).
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
LINKS_FILE = "links.json"  # {backend: where it shows the run}: rewritten when a backend opens
RUN_TAG = "flash_grpo.run_id"  # MLflow: the tag that finds the run again
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

    def __init__(self, spec: RunSpec, run: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(spec.log_dir), **spec.options.get(self.name, {}))
        self.link = f"tensorboard --logdir {spec.log_dir}"

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # an iteration's numbers are on disk, for a live TensorBoard, when the call returns

    def video(self, tag: str, video, step: int, fps: int) -> None:
        """`video` uint8 [T, H, W, 3]: a video where moviepy can encode it, else a frame grid image."""
        import torch

        if video_encoder_available():
            frames = torch.as_tensor(video).permute(0, 3, 1, 2)[None]  # [1, T, C, H, W]
            self.writer.add_video(tag, frames, global_step=step, fps=fps)
        else:
            self.writer.add_image(f"{tag}_frames", frame_strip(video), global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """The `wandb` backend: one W&B run with the run's id, resumed by every process; `options.wandb`
    goes to `wandb.init` (e.g. `mode: offline`, `entity`, `tags`)."""

    name = "wandb"

    def __init__(self, spec: RunSpec, run: str):
        import wandb

        options = {"project": spec.project, "name": spec.run_name, "dir": str(spec.log_dir),
                   **spec.options.get(self.name, {})}
        self.wandb = wandb
        self.run = wandb.init(id=run, resume="allow", **options)
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")  # steps may arrive out of order across processes
        self.link = self.run.url or f"offline: wandb sync {Path(self.run.dir).parent}"

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "iteration": step})

    def video(self, tag: str, video, step: int, fps: int) -> None:
        if video_encoder_available():
            media = self.wandb.Video(video.transpose(0, 3, 1, 2), fps=fps, format="gif")  # [T, C, H, W]
        else:
            media, tag = self.wandb.Image(frame_strip(video)), f"{tag}_frames"
        self.run.log({tag: media, "iteration": step})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """The `mlflow` backend: the run tagged with the run's id in the experiment `project`, created by
    the first process; `options.mlflow.tracking_uri` (default a SQLite store in the run's folder) and
    `artifact_location` (a new experiment's; default the run's folder) say where."""

    name = "mlflow"

    def __init__(self, spec: RunSpec, run: str):
        from mlflow.tracking import MlflowClient

        options = dict(spec.options.get(self.name, {}))
        folder = spec.log_dir.resolve()
        uri = options.pop("tracking_uri", None) or f"sqlite:///{folder / 'mlflow.db'}"
        location = options.pop("artifact_location", None) or (folder / "mlflow-artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri, **options)
        experiment = self.client.get_experiment_by_name(spec.project)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(spec.project, artifact_location=location))
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run}'", max_results=1)
        if found:
            self.run = found[0].info.run_id
            self.client.update_run(self.run, status="RUNNING")
        else:
            self.run = self.client.create_run(experiment_id, run_name=spec.run_name, tags={RUN_TAG: run}).info.run_id
        self.link = f"{uri} experiment {experiment_id} run {self.run}"

    def scalars(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run, metrics=[Metric(tag, value, now, step) for tag, value in values.items()])

    def video(self, tag: str, video, step: int, fps: int) -> None:
        self.client.log_image(self.run, frame_strip(video), key=f"{tag}_frames", step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run)  # a later process sets it running again


BACKENDS = {backend.name: backend for backend in (TensorBoard, WandB, MLflow)}  # config/monitoring.py names them


def frame_strip(video):
    """uint8 [H, T' * W, 3]: at most FRAME_LIMIT evenly spaced frames of `video` [T, H, W, 3], left to
    right: how a sample shows where no video encoder is installed."""
    import numpy as np

    frames = np.asarray(video)
    chosen = frames[:: max(1, math.ceil(len(frames) / FRAME_LIMIT))]
    return np.ascontiguousarray(np.concatenate(list(chosen), axis=1))


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

    def log_scalars(self, values: Mapping[str, Any], step: int, prefix: str = "", measured: bool = False) -> None:
        """Every finite number of `values` (nested mappings as `a/b`) under `prefix/`, at `step`.

        A result is logged again at a step only when it changed (the workspace's outputs changed); a
        `measured` value (a wall time, a peak memory: it differs on every run) only once a step, so
        a stage rerun after an interruption adds no second point."""
        flat = {f"{prefix}/{key}" if prefix else key: float(value) for key, value in _numbers(values)}
        new = {tag: value for tag, value in flat.items() if self._is_new(tag, step, value, measured)}
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

    def _is_new(self, tag: str, step: int, value, measured: bool = False) -> bool:
        if not self.active:
            return False
        self._backends()
        if measured:
            return (tag, step) not in self._logged
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
                    self._open[name] = self._classes[name](self.spec, self.run_id)
                except Exception as error:  # noqa: BLE001 - not installed, a bad option: the stage goes on
                    self._warn(name, error)
            self._write_links()
        return self._open or {}

    def _write_links(self) -> None:
        """links.json: where each open backend shows the run (for the flow run's page), when it changed."""
        from flash_grpo_core.artifacts.atomic import write_json

        links = {name: str(getattr(backend, "link", "")) for name, backend in self._open.items()}
        path = self.spec.log_dir / LINKS_FILE
        try:
            if links and read_links(self.spec.log_dir) != links:
                write_json(links, path)
        except OSError as error:
            self._warn("tracking", error)

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


def read_links(log_dir: Path) -> dict[str, str]:
    """The run's links.json ({} before a backend opened, or unreadable)."""
    try:
        return dict(json.loads((Path(log_dir) / LINKS_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return {}


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
