"""What every pipeline stage shares: argument parsing, parameter loading, error reporting, progress.

Stages get every path from `dvc.yaml` on their command line and read their settings from
`params.yaml`; known input errors end the stage with exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import NoReturn

from flash_grpo_core.artifacts.faults import FAULT_ENV, fault_point  # noqa: F401 - re-exported for the stages
from stages.runtime import launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local paths only


def parser(name: str, description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description)
    result.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return result


def load_params(path: str):
    from flash_grpo_core.config import load_params as load

    return load(path)


def engine_at(params, checkpoint: str, text_encoder: bool = True, optimizer: bool = False):
    """The preset's engine with the trainable weights and EMA of `checkpoint`, and with `optimizer`
    its AdamW state (only the update needs it)."""
    from flash_grpo_core.artifacts.checkpoint import load_checkpoint
    from flash_grpo_core.engine.iteration import build_engine

    engine = build_engine(params, text_encoder)
    state = load_checkpoint(engine.policy, checkpoint, optimizer)
    return engine, state


def warn(name: str, warning: str | None) -> None:
    """One warning line on stderr (nothing for None), as `validate: warning: ...`."""
    if warning:
        print(f"{name}: warning: {warning}", file=sys.stderr, flush=True)


def progress_bar(total: int, description: str):
    """A tqdm bar on stderr, quiet when stderr is not a terminal unless FLASH_GRPO_PROGRESS=1."""
    from tqdm import tqdm

    show = sys.stderr.isatty() or os.environ.get("FLASH_GRPO_PROGRESS") == "1"
    return tqdm(total=total, desc=description, unit="sample", disable=not show, leave=False)


def light_errors() -> tuple[type[BaseException], ...]:
    """The known input errors whose modules import no torch: what the params and inputs checks raise."""
    from flash_grpo_core.artifacts.prompt_sources import PromptFileError
    from flash_grpo_core.config import ConfigError
    from flash_grpo_core.pipeline.lock_outputs import DamagedOutputError
    from flash_grpo_core.models.layout import ModelPathError

    return ConfigError, ModelPathError, PromptFileError, DamagedOutputError


def known_errors() -> tuple[type[BaseException], ...]:
    """Every known input error: the light ones and those of modules that import torch."""
    from flash_grpo_core.artifacts.checkpoint import CheckpointError
    from flash_grpo_core.artifacts.scores import ScoresError
    from flash_grpo_core.artifacts.tar_io import ShardError
    from flash_grpo_core.method.advantages import NonFiniteError
    from flash_grpo_core.pipeline.health import HealthStop
    from flash_grpo_core.rewards import RewardError

    return (*light_errors(), ShardError, CheckpointError, RewardError, ScoresError, NonFiniteError, HealthStop,
            FileNotFoundError)


INPUT_ERROR_EXIT = 2  # a known, deterministic input error: rerunning cannot help
TRANSIENT_EXIT = 75  # EX_TEMPFAIL: an unreachable reward server; a retry may succeed


def run(name: str, work, args, argv: list[str] | None = None, distributed: bool = False) -> int:
    """Run a stage's work, `work(args)` (a top-level function of the stage module, `args` its parsed
    command line), which returns the fields of the stage's summary line. Known input errors become a
    one-line message and exit code 2, an unreachable reward exit code 75.

    `distributed` stages run on as many processes as the environment asks for (stages/runtime/launch.py):
    this process then starts torchrun and returns the worst rank's exit code, and each rank joins
    the process group before its work runs. Otherwise, with a warm runner listening
    (stages/runtime/warm.py), a stage started as `python -m stages.<name>` runs there instead and this
    returns its exit code."""
    from stages.runtime import warm_client, watchdog

    watchdog.start()  # end with the process that started this one (DVC, torchrun), never orphaned
    fault_point("started", int(os.environ.get("RANK", "0")))
    if distributed:
        try:
            if launch.wanted():
                return launch.launch(f"stages.{name}", sys.argv[1:] if argv is None else list(argv))
        except launch.LaunchError as error:
            print(f"{name}: error: {error}", file=sys.stderr)
            return INPUT_ERROR_EXIT
    if not launch.inside():
        delegated = warm_client.delegate()
        if delegated is not None:
            return delegated
    code = 1  # an unexpected exception propagates; the rank's record says it failed
    try:
        code = _run_work(name, work, args, distributed)
    finally:
        launch.record_exit(code)
    return code


def _run_work(name: str, work, args, distributed: bool) -> int:
    began = time.perf_counter()
    world = None
    if distributed and launch.inside():
        from flash_grpo_core.engine.distributed import init_from_env

        world = init_from_env()
        fault_point("joined", world.rank)
    try:
        summary = work(args)
    except Exception as error:  # noqa: BLE001 - filtered right below
        rank = f" (rank {world.rank})" if world is not None else ""
        if isinstance(error, light_errors()):  # before the imports below, which load torch (seconds)
            print(f"{name}: error{rank}: {error}", file=sys.stderr)
            return INPUT_ERROR_EXIT
        from flash_grpo_core.rewards.base import RewardUnavailable

        if isinstance(error, RewardUnavailable):  # transient: an orchestrator may retry the stage
            print(f"{name}: error (transient){rank}: {error}", file=sys.stderr)
            return TRANSIENT_EXIT
        if isinstance(error, known_errors()):
            print(f"{name}: error{rank}: {error}", file=sys.stderr)
            return INPUT_ERROR_EXIT
        raise
    if world is not None:
        from flash_grpo_core.engine.distributed import shutdown

        shutdown()
    if world is None or world.is_main:
        processes = {"processes": world.size if world is not None else 1} if distributed else {}
        fields = " ".join(f"{key}={value}" for key, value in {**summary, **processes}.items())
        print(f"{name}: {fields} seconds={time.perf_counter() - began:.1f}", flush=True)
    return 0


def finish(code: int) -> NoReturn:
    """End a stage process (`python -m stages.<name>`) with `code` without the interpreter's teardown,
    which frees every module and object of torch, diffusers and peft one by one: about a second per
    stage. The stage's outputs are already written and renamed into place; the standard streams
    and logging are flushed here. Only for a stage's `__main__`: it ends the process."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream has nothing left to flush
            stream.flush()
    fault_point("finished")
    os._exit(code)


@contextlib.contextmanager
def timer(record: dict, key: str):
    began = time.perf_counter()
    yield
    record[key] = round(time.perf_counter() - began, 3)
