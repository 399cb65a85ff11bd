"""The outputs dvc.lock records, checked against the workspace by their md5s, as DVC 3 hashes them.

Two uses:
- `changed_outputs`: every recorded output (cached or `cache: false` metrics and plots) that is
  missing or whose bytes differ from its lock entry: what a run lost (bench/faults/repro.py).
- `verify_linked_outputs`: only the workspace files that are hard links or symlinks into the DVC
  cache (`cache.type` hardlink/symlink, README "Caching"), re-hashed against their recorded md5.
  Such a file edited in place has changed its cache object under the old name too, and the next
  `dvc repro` would link those bad bytes back into every checkout; found before DVC runs a stage,
  the damage is named instead (scripts/verify_cache.py --links, and the pipeline's first stage).
  Only links are hashed: with copies (the default) the check costs one `stat` per output file.

DVC 3's hashes: a file's md5 is the md5 of its bytes; a directory's is the md5 of the JSON list
`[{"md5": ..., "relpath": ...}, ...]` of its files (sorted by relpath, keys sorted) plus `.dir`,
and that listing is the cache object `files/md5/<2 hex>/<30 hex>.dir`.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


class DamagedOutputError(ValueError):
    """Outputs linked into the DVC cache were changed in place; the message names each, one a line."""


@dataclass(frozen=True)
class LockedOutput:
    """One output of dvc.lock: its path (relative to the project), md5, and the stage writing it."""

    stage: str
    path: str
    md5: str

    @property
    def is_dir(self) -> bool:
        return self.md5.endswith(".dir")


def locked_outputs(lock: dict) -> list[LockedOutput]:
    """Every output of a loaded dvc.lock (`{"stages": {...}}` or its `stages` mapping)."""
    stages = lock.get("stages", lock) if isinstance(lock, dict) else {}
    return [LockedOutput(stage, out["path"], out["md5"]) for stage, entry in stages.items()
            for out in (entry or {}).get("outs", []) if out.get("md5")]


def read_lock(path: Path) -> list[LockedOutput]:
    from flash_grpo_core.config import read_yaml

    return locked_outputs(read_yaml(path)) if Path(path).is_file() else []


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_files(folder: Path) -> list[str]:
    """The relpaths of the files under `folder` (symlinks followed), sorted as DVC sorts them."""
    return sorted(str(path.relative_to(folder).as_posix()) for path in folder.rglob("*") if path.is_file())


def tree_md5(folder: Path) -> str:
    """A directory's md5 as DVC 3 records it (`<md5>.dir`)."""
    listing = [{"md5": file_md5(folder / name), "relpath": name} for name in tree_files(folder)]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8"), usedforsecurity=False).hexdigest() + ".dir"


def output_state(root: Path, out: LockedOutput) -> str | None:
    """None when the output is in place with its recorded bytes, else "missing" or "changed"."""
    path = root / out.path
    if out.is_dir:
        if not path.is_dir():
            return "missing"
        return None if tree_md5(path) == out.md5 else "changed"
    if not path.is_file():
        return "missing"
    return None if file_md5(path) == out.md5 else "changed"


def changed_outputs(root: Path, outs: list[LockedOutput]) -> dict[str, str]:
    """{path: "missing" | "changed"} of the outputs in `outs` not in place with their recorded bytes."""
    return {out.path: state for out in outs if (state := output_state(Path(root), out)) is not None}


def cache_dir(root: Path) -> Path:
    """The DVC cache of the checkout at `root`: `cache.dir` of .dvc/config.local, else of .dvc/config
    (a relative one is relative to .dvc/), else .dvc/cache."""
    for name in ("config.local", "config"):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(Path(root) / ".dvc" / name)
        except configparser.Error:
            continue
        found = parser.get("cache", "dir", fallback=None)
        if found:
            found = found.strip().strip("'\"")
            return Path(found) if os.path.isabs(found) else Path(root) / ".dvc" / found
    return Path(root) / ".dvc" / "cache"


def is_link(path: Path) -> bool:
    """Whether the file shares its bytes with another name: a symlink or a hard link."""
    try:
        return path.is_symlink() or path.stat().st_nlink > 1
    except OSError:
        return False


def _listing(cache: Path, md5: str) -> dict[str, str] | None:
    """{relpath: md5} of a directory output, from its `.dir` object in the cache (None if absent)."""
    path = cache / "files" / "md5" / md5[:2] / md5[2:]
    try:
        return {entry["relpath"]: entry["md5"] for entry in json.loads(path.read_text(encoding="utf-8"))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _linked_files(root: Path, out: LockedOutput, cache: Path) -> list[tuple[str, str]]:
    """[(path relative to root, recorded md5)] of the output's files that are links into the cache."""
    path = root / out.path
    if not out.is_dir:
        return [(out.path, out.md5)] if path.is_file() and is_link(path) else []
    if not path.is_dir():
        return []
    linked = [name for name in tree_files(path) if is_link(path / name)]
    if not linked:
        return []
    listing = _listing(cache, out.md5) or {}
    return [(f"{out.path}/{name}", listing.get(name, "")) for name in linked]


def verify_linked_outputs(root: Path, lock: Path | None = None, cache: Path | None = None) -> list[str]:
    """One line per output file that is a link into the DVC cache and no longer has its recorded
    bytes (or no record to check against); [] when every linked output is intact."""
    root = Path(root)
    cache = Path(cache) if cache is not None else cache_dir(root)
    bad = []
    for out in read_lock(lock or root / "dvc.lock"):
        for relative, md5 in _linked_files(root, out, cache):
            actual = file_md5(root / relative)
            if actual == md5:
                continue
            object_path = cache / "files" / "md5" / md5[:2] / md5[2:] if md5 else None
            recorded = f"dvc.lock's {md5}" if md5 else "no md5 recorded in the cache's listing"
            bad.append(f"{relative} (output of {out.stage}) is a link into the DVC cache and was changed in place "
                       f"(md5 {actual}, {recorded}): the cache object changed with it; remove "
                       f"{object_path or 'the object'} and {relative}, then run `dvc repro`")
    return bad


def require_intact_links(root: Path) -> None:
    """DamagedOutputError naming every linked output changed in place (nothing without a dvc.lock)."""
    if not (Path(root) / "dvc.lock").is_file():
        return
    damaged = verify_linked_outputs(root)
    if damaged:
        raise DamagedOutputError("\n".join(damaged))
