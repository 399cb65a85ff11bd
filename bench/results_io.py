"""The one writer of benchmark records: `<name>.json` and `<name>.md` under bench/results/ (or --out-dir).

    from bench.results_io import RESULTS, write_results
    write_results("iteration_cost-tiny-cpu", results, table, args.out_dir)

Each file is written atomically (a temporary file beside it, then `os.replace`: an interrupted run
leaves the previous record or the new one, never half of one; flash_grpo_core/artifacts/atomic.py),
and the writer prints where the two files went. The JSON is `json.dumps(data, indent=...) + "\\n"`;
a benchmark passes the `indent`, `sort_keys` and `ensure_ascii` its records have always had, so the
same data gives the same bytes. The markdown ends with exactly the newline it was given, or one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flash_grpo_core.artifacts.atomic import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"


def json_text(data, *, indent: int = 2, sort_keys: bool = False, ensure_ascii: bool = True) -> str:
    """A record's JSON text, with a final newline."""
    return json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8, newlines as given) at `path`, atomically; creates the folder. Returns the path."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_bytes(text.encode("utf-8"))
    return path


def shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (no machine paths in logs)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def write_results(name: str, data, markdown: str, out_dir: str | os.PathLike = RESULTS, *, indent: int = 2,
                  sort_keys: bool = False, ensure_ascii: bool = True) -> tuple[Path, Path]:
    """Write `out_dir/name.json` (`data`) and `out_dir/name.md` (`markdown`), each atomically, and
    print where; returns both paths."""
    out_dir = Path(out_dir)
    json_path = write_text(out_dir / f"{name}.json",
                           json_text(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii))
    md_path = write_text(out_dir / f"{name}.md", markdown if markdown.endswith("\n") else markdown + "\n")
    print(f"wrote {shown(json_path)} and {shown(md_path)}", flush=True)
    return json_path, md_path
