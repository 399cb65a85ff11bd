"""Re-hash every object of the DVC cache against its name; name each bad one, exit code 2 if any.

    python scripts/verify_cache.py                 # the checkout's cache (`dvc cache dir`)
    python scripts/verify_cache.py --cache DIR     # another cache (e.g. a shared one)
    python scripts/verify_cache.py --links         # only the outputs that are links, against dvc.lock

DVC 3 stores an object under `files/md5/<first 2 hex>/<other 30 hex>`: a file's md5 is its name, and
a directory's listing is a JSON `.dir` object whose md5 is the name without `.dir`. DVC trusts those
names: an object changed in place (through a hard link or symlink to an output, see README,
"Caching") stays "cached" and `dvc checkout` / `dvc repro` link or copy its bad bytes back. This
finds them; remove each one it names and run `dvc repro` (or `dvc fetch` from a remote) to restore
it. Directory listings are also checked for entries whose object is missing.

`--links` is the cheap check to run before every `dvc repro` when `cache.type` allows links: it
re-hashes only the workspace outputs that are hard links or symlinks into the cache against their
md5 in dvc.lock (flash_grpo_core/pipeline/lock_outputs.py), so an output edited in place is named before a
stage reruns and DVC links the damaged object back.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flash_grpo_core, run as a script

from flash_grpo_core.pipeline.lock_outputs import file_md5 as md5  # noqa: E402  (after the path above)

OBJECT_NAME = re.compile(r"[0-9a-f]{30}(\.dir)?")
BAD_EXIT = 2


def objects(cache: Path) -> list[Path]:
    """Every object file under `cache/files/md5`, in name order."""
    root = cache / "files" / "md5"
    return sorted(path for path in root.glob("??/*") if path.is_file()) if root.is_dir() else []


def check_object(path: Path, root: Path) -> str | None:
    """Why the object at `path` is bad, or None when its bytes hash to its name."""
    name = path.parent.name + path.name
    if not re.fullmatch(r"[0-9a-f]{2}", path.parent.name) or not OBJECT_NAME.fullmatch(path.name):
        return None  # not an object (DVC's own temporaries, e.g. `*.tmp`)
    expected = name.removesuffix(".dir")
    actual = md5(path)
    if actual != expected:
        return f"md5 {actual}, its name says {expected}"
    if path.name.endswith(".dir"):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            listed = [entry["md5"] for entry in entries]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            return f"not a directory listing ({error!r})"
        missing = [h for h in listed if not (root / h[:2] / h[2:]).is_file()]
        if missing:
            return f"lists {len(missing)} object(s) not in the cache, e.g. {missing[0]} (incomplete, not corrupt)"
    return None


def verify(cache: Path) -> tuple[int, list[tuple[Path, str]]]:
    """(objects checked, [(bad object, why)])."""
    found = objects(cache)
    root = cache / "files" / "md5"
    bad = [(path, why) for path in found if (why := check_object(path, root)) is not None]
    return len(found), bad


def configured_cache() -> Path:
    """The checkout's cache as DVC resolves it (`cache.dir` in .dvc/config or config.local), else .dvc/cache."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    try:
        found = subprocess.run([dvc, "cache", "dir"], capture_output=True, text=True, check=False, timeout=60)
    except OSError:
        return Path(".dvc/cache")
    return Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else Path(".dvc/cache")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/verify_cache.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="the DVC cache (default: `dvc cache dir`)")
    parser.add_argument("--links", action="store_true",
                        help="check only the workspace outputs that are links into the cache, against dvc.lock")
    args = parser.parse_args(argv)
    if args.links:
        return verify_links(args.cache)
    args.cache = args.cache or configured_cache()
    if not args.cache.is_dir():
        print(f"verify_cache: error: {args.cache} is not a directory", file=sys.stderr)
        return BAD_EXIT
    checked, bad = verify(args.cache)
    for path, why in bad:
        print(f"verify_cache: bad object {path}: {why}", file=sys.stderr)
    print(f"verify_cache: {checked} objects checked, {len(bad)} bad")
    return BAD_EXIT if bad else 0


def verify_links(cache: Path | None) -> int:
    """`--links`: name every linked output of this checkout changed in place; exit code 2 if any."""
    from flash_grpo_core.pipeline.lock_outputs import verify_linked_outputs

    bad = verify_linked_outputs(Path.cwd(), cache=cache)
    for line in bad:
        print(f"verify_cache: error: {line}", file=sys.stderr)
    print(f"verify_cache: linked outputs checked against dvc.lock, {len(bad)} changed")
    return BAD_EXIT if bad else 0


if __name__ == "__main__":
    sys.exit(main())
