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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local paths only


def parser(name: str, description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description)
    result.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return result


def load_params(path: str):
    from flash_grpo_core.config import load_params as load

    return load(path)


def engine_at(params, checkpoint: str, text_encoder: bool = True):
    """The preset's engine with the trainable weights, EMA and optimizer state of `checkpoint`."""
    from flash_grpo_core.artifacts.checkpoint import load_checkpoint
    from flash_grpo_core.engine.iteration import build_engine

    engine = build_engine(params, text_encoder)
    state = load_checkpoint(engine.policy, checkpoint)
    return engine, state


def progress_bar(total: int, description: str):
    """A tqdm bar on stderr, quiet when stderr is not a terminal unless FLASH_GRPO_PROGRESS=1."""
    from tqdm import tqdm

    show = sys.stderr.isatty() or os.environ.get("FLASH_GRPO_PROGRESS") == "1"
    return tqdm(total=total, desc=description, unit="sample", disable=not show, leave=False)


def known_errors() -> tuple[type[BaseException], ...]:
    from flash_grpo_core.artifacts.checkpoint import CheckpointError
    from flash_grpo_core.artifacts.prompts import PromptFileError
    from flash_grpo_core.artifacts.scores import ScoresError
    from flash_grpo_core.artifacts.tar_io import ShardError
    from flash_grpo_core.config import ConfigError
    from flash_grpo_core.method.advantages import NonFiniteError
    from flash_grpo_core.models.wan import ModelPathError
    from flash_grpo_core.rewards import RewardError

    return (ConfigError, ModelPathError, PromptFileError, ShardError, CheckpointError, RewardError, ScoresError,
            NonFiniteError, FileNotFoundError)


INPUT_ERROR_EXIT = 2  # a known, deterministic input error: rerunning cannot help
TRANSIENT_EXIT = 75  # EX_TEMPFAIL: an unreachable reward server; a retry may succeed


def run(name: str, body) -> int:
    """Run a stage body; known input errors become a one-line message and exit code 2, an
    unreachable reward exit code 75. With a warm runner listening (stages/warm.py), a stage started
    as `python -m stages.<name>` runs there instead and this returns its exit code."""
    from stages import warm_client

    delegated = warm_client.delegate()
    if delegated is not None:
        return delegated
    began = time.perf_counter()
    try:
        summary = body()
    except Exception as error:  # noqa: BLE001 - filtered right below
        from flash_grpo_core.rewards.base import RewardUnavailable

        if isinstance(error, RewardUnavailable):  # transient: an orchestrator may retry the stage
            print(f"{name}: error (transient): {error}", file=sys.stderr)
            return TRANSIENT_EXIT
        if isinstance(error, known_errors()):
            print(f"{name}: error: {error}", file=sys.stderr)
            return INPUT_ERROR_EXIT
        raise
    fields = " ".join(f"{key}={value}" for key, value in summary.items())
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
    os._exit(code)


@contextlib.contextmanager
def timer(record: dict, key: str):
    began = time.perf_counter()
    yield
    record[key] = round(time.perf_counter() - began, 3)
