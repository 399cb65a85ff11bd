"""Scratch copies of the project for end-to-end runs (tests, benchmarks): a git + DVC workspace.

`copy_project` copies the tracked and new (not ignored) files of a checkout, without run outputs
or the root `dvc.lock` (bench/toy/dvc.lock, the shipped base's, stays), and commits them in a
fresh git repository so DVC can run there; with `preset` (and `iterations`) it first selects that
preset in the copy's params.yaml, as the tests and benchmarks of the tiny preset do (the default
preset is the toy task); with `cache_dir`, the copy's DVC cache (and so its run cache) is that
folder, which several copies may share: a stage already run in one copy with the same command,
dependencies and params is restored in another instead of run. `tool_env` puts this interpreter's
bin directory first on PATH so `python` and `dvc` in `dvc.yaml` commands are the ones of the
running environment, with telemetry off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TELEMETRY_OFF = {"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_ERROR_REPORTING": "false"}


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **TELEMETRY_OFF, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def project_files(root: Path) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    return [name for name in listed if name and (root / name).is_file() and name != "dvc.lock"]


def select_preset(params: Path, preset: str, iterations: int) -> None:
    """Set `preset`, `iterations` and the pipeline keys spelling them out in a params.yaml (comments kept)."""
    from ruamel.yaml import YAML

    from flash_grpo_core.config.dvc_layout import set_dvc_layout

    yaml = YAML()  # round-trip
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null",
                                                                                         "null"))
    data = yaml.load(params.read_text())
    data["preset"] = preset
    set_dvc_layout(data, iterations)
    with open(params, "w") as handle:
        yaml.dump(data, handle)


def copy_project(root: Path, destination: Path, preset: str | None = None, iterations: int = 2,
                 cache_dir: Path | None = None) -> Path:
    """Copy the checkout at `root` into `destination` and commit it there; returns `destination`.
    With `preset`, the copy's params.yaml selects it with `iterations` iterations; with `cache_dir`,
    DVC caches there (`.dvc/config.local`, which git ignores)."""
    for name in project_files(root):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination / name)
    if preset is not None:
        select_preset(destination / "params.yaml", preset, iterations)
    if cache_dir is not None:
        (destination / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {Path(cache_dir).resolve()}\n")
    identity = ["-c", "user.email=pipeline@localhost", "-c", "user.name=pipeline"]
    for command in (["init", "-q"], [*identity, "add", "-A"], [*identity, "commit", "-qm", "workspace copy"]):
        subprocess.run(["git", *command], cwd=destination, check=True, capture_output=True)
    return destination
