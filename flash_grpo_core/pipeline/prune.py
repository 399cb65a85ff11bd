"""Thin out old checkpoints: keep every n-th iteration's (and the latest), remove the others from the
workspace and their objects from the DVC cache.

    python -m flash_grpo_core.pipeline.prune [--params params.yaml] [--every N] [--dry-run] [--keep-cache]

For full fine-tuning at 14B a checkpoint's weights and EMA are 114 GB per iteration (AdamW's moments
go beside it, `train.optimizer_state: beside`): a 100-iteration run cannot keep them all. `dvc gc`
cannot help, since every iteration's output stays in dvc.lock. This command removes the checkpoint
of every iteration k with k % N != 0 that is not the latest, once nothing left to run reads it (the
next iteration's rollout and update, and its own evaluation when pipeline.eval_at lists it), and
records the removed ones with their hashes in <root>/<preset>/pruned.json (a later prune does not
list them again). N is `pipeline.keep_checkpoints_every` unless --every is given; 0 keeps all.

DVC then reports those outputs as deleted. `dvc repro --allow-missing` skips a stage whose only
change is missing data, so the run continues from the latest checkpoint as if nothing was removed:
the train-loop flow passes it whenever pruned.json lists an iteration, and prunes after every update
when pipeline.keep_checkpoints_every > 0. Resuming stays exact: the latest complete iteration is
never removed, and its AdamW moments are kept beside it (train.keep_optimizer_states).

Cache objects are removed only when no other output in dvc.lock lists them. With a cache shared by
several workspaces that hold the same iterations, pass --keep-cache (workspace copies only) and
collect the cache with `dvc gc` across those workspaces instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT = re.compile(r"it(\d+)/checkpoint")


@dataclass
class Plan:
    """What a prune removes (`pruned`: iteration -> dvc.lock's hash of its checkpoint) and keeps."""

    kept: list[int]
    pruned: dict[int, str]
    objects: list[Path] = field(default_factory=list)
    bytes: int = 0


def _lock(project: Path) -> dict:
    from flash_grpo_core.config import ConfigError, read_yaml

    path = project / "dvc.lock"
    if not path.is_file():
        return {}
    try:
        stages = read_yaml(path).get("stages") or {}
    except (ConfigError, AttributeError) as error:
        raise ConfigError(f"{path} is not a DVC lock file ({error})") from None
    return stages if isinstance(stages, dict) else {}


def _outs(stage: dict) -> list[dict]:
    return [out for out in stage.get("outs") or [] if isinstance(out, dict) and "path" in out]


def checkpoints(stages: dict, run_dir: str) -> dict[int, str]:
    """{iteration: md5} of every checkpoint output under `run_dir` in dvc.lock (it0 from init)."""
    found = {}
    for stage in stages.values():
        for out in _outs(stage):
            path = str(out["path"])
            if path.startswith(run_dir + "/") and (match := CHECKPOINT.fullmatch(path[len(run_dir) + 1:])):
                found[int(match.group(1))] = str(out.get("md5", ""))
    return found


def plan(stages: dict, run_dir: str, every: int, eval_at: tuple[int, ...] = ()) -> Plan:
    """Keep iteration k when k % every == 0, when it is the latest, or when a stage that reads it has
    not run yet (its evaluation, or the next iteration's rollout and update)."""
    found = checkpoints(stages, run_dir)
    if every <= 0 or not found:
        return Plan(sorted(found), {})
    latest = max(found)

    def still_read(k: int) -> bool:
        waiting = [f"rollout@{k + 1}", f"update@{k + 1}", *([f"eval_checkpoint@{k}"] if k in eval_at else [])]
        return any(name not in stages for name in waiting)

    pruned = {k: md5 for k, md5 in found.items() if k % every and k != latest and not still_read(k)}
    return Plan(sorted(set(found) - set(pruned)), dict(sorted(pruned.items())))


def _object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _listed(cache: Path, md5: str) -> set[str]:
    """A hash and, for a directory (`<md5>.dir`), the hashes its cached listing names."""
    names = {md5}
    if md5.endswith(".dir"):
        try:
            names |= {entry["md5"] for entry in json.loads(_object(cache, md5).read_text())}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not in this cache (or unreadable): nothing of it to remove
    return names


def cache_objects(stages: dict, pruned: dict[int, str], run_dir: str, cache: Path) -> list[Path]:
    """The cache objects only the pruned checkpoints name (not any other output or dependency in dvc.lock)."""
    pruned_paths = {f"{run_dir}/it{k}/checkpoint" for k in pruned}
    kept: set[str] = set()
    for stage in stages.values():
        for entry in [*_outs(stage), *(stage.get("deps") or [])]:
            if isinstance(entry, dict) and entry.get("md5") and str(entry.get("path")) not in pruned_paths:
                kept |= _listed(cache, str(entry["md5"]))
    removable = set().union(*(_listed(cache, md5) for md5 in pruned.values())) - kept
    return sorted(path for name in removable if (path := _object(cache, name)).is_file())


def dvc_cache_dir(project: Path) -> Path:
    """The workspace's cache as DVC resolves it (cache.dir in .dvc/config or config.local)."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    found = subprocess.run([dvc, "cache", "dir"], cwd=project, capture_output=True, text=True, check=False,
                           timeout=120)
    path = Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else Path(".dvc/cache")
    return path if path.is_absolute() else project / path


def record_path(project: Path, params) -> Path:
    return project / params.pipeline.root / params.preset / "pruned.json"


def pruned_iterations(project: Path, params) -> dict[int, str]:
    """{iteration: hash} of the checkpoints removed by earlier prunes and still so in dvc.lock."""
    path = record_path(project, params)
    try:
        recorded = json.loads(path.read_text())["iterations"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    locked = checkpoints(_lock(project), f"{params.pipeline.root}/{params.preset}")
    return {int(k): md5 for k, md5 in recorded.items() if locked.get(int(k)) == md5}


def prune(project: Path, params, every: int | None = None, dry_run: bool = False, keep_cache: bool = False) -> Plan:
    """Remove the checkpoints `plan` gives up (workspace folder, then cache objects), recorded first."""
    from flash_grpo_core.artifacts.atomic import write_json

    every = params.pipeline.keep_checkpoints_every if every is None else every
    run_dir = f"{params.pipeline.root}/{params.preset}"

    def folder(k: int) -> Path:
        return project / run_dir / f"it{k}" / "checkpoint"

    stages = _lock(project)
    result = plan(stages, run_dir, every, tuple(params.pipeline.eval_at))
    done = pruned_iterations(project, params)  # gone already (a folder left: an interrupted prune)
    result.pruned = {k: md5 for k, md5 in result.pruned.items() if k not in done or folder(k).exists()}
    if not result.pruned:
        return result
    if not keep_cache:
        result.objects = cache_objects(stages, result.pruned, run_dir, dvc_cache_dir(project))
        result.bytes = sum(path.stat().st_size for path in result.objects)
    if dry_run:
        return result
    # the record first: an interrupted prune leaves iterations listed whose removal a rerun completes
    # the record first, the folders last: a prune interrupted in between leaves a listed iteration
    # whose folder is still there, and the next prune completes it
    write_json({"every": every, "iterations": {str(k): md5 for k, md5 in sorted({**done, **result.pruned}.items())}},
               record_path(project, params))
    for path in result.objects:
        path.unlink(missing_ok=True)
    for k in result.pruned:
        if folder(k).is_symlink() or folder(k).is_file():
            folder(k).unlink()
        elif folder(k).exists():
            shutil.rmtree(folder(k))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_grpo_core.pipeline.prune",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--every", type=int, default=None,
                        help="keep every N-th iteration's checkpoint (default: pipeline.keep_checkpoints_every)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    parser.add_argument("--keep-cache", action="store_true", help="remove workspace copies only")
    args = parser.parse_args(argv)
    if args.every is not None and args.every < 0:
        parser.error("--every must be >= 0")
    from flash_grpo_core.config import ConfigError, load_params

    params_path = Path(args.params)
    try:
        params = load_params(params_path)
        result = prune(params_path.resolve().parent, params, args.every, args.dry_run, args.keep_cache)
    except ConfigError as error:
        print(f"prune: error: {error}", file=sys.stderr)
        return 2
    verb = "would remove" if args.dry_run else "removed"
    iterations = ", ".join(f"it{k}" for k in result.pruned) or "none"
    print(f"prune: {verb} {iterations} ({len(result.objects)} cache objects, {result.bytes / 1e9:.2f} GB); "
          f"kept {', '.join(f'it{k}' for k in result.kept) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
