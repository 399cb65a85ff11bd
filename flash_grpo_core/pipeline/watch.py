"""Watch a run from its files, without a tracker: one row per finished iteration and what runs now.

    python -m flash_grpo_core.pipeline.watch [RUN_DIR] [--follow [SECONDS]] [--json] [--params params.yaml]

RUN_DIR (default: params.yaml's `pipeline.root`/`preset`, e.g. `runs/tiny`) holds per iteration k
`it<k>/metrics.json` (the update stage's row), `it<k>/score.json` (each reward component's mean when
several are combined) and the untracked `it<k>/{rollout,update}.timings.json`; the evaluated
checkpoints' `eval/points/it<k>/metrics.json` and the evaluation's `eval/metrics.json`. A missing or
unreadable file shows as '-'. The last line names the stage in progress: the one DVC's lock
(`.dvc/tmp/rwlock`) says is writing, else the next one the files call for. `--follow` prints the
table once, then every SECONDS (default 10) only the rows and the status that changed, in plain
fixed-width text (a log over ssh, no terminal control); Ctrl-C ends it. `--json`: the same rows as
JSON lines (`"kind"`: iteration, evaluation, status). Torch-free: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# (row key, header, width); the learning rate and the reward components appear only when present
COLUMNS = (("iteration", "it", 4), ("reward_mean", "reward", 10), ("reward_std", "std", 10),
           ("loss", "loss", 11), ("clip_fraction", "clip", 9), ("approx_kl", "kl", 10),
           ("grad_norm", "grad_norm", 10), ("learning_rate", "lr", 9), ("rollout_seconds", "rollout_s", 9),
           ("train_seconds", "train_s", 9), ("eval_reward", "eval_reward", 11))
OPTIONAL = {"learning_rate"}
ITERATION = re.compile(r"it(\d+)")


@dataclass(frozen=True)
class Plan:
    """What the params say the run will do; None/() when no params.yaml matches the run directory."""
    iterations: int | None = None
    eval_at: tuple[int, ...] = ()


class Files:
    """JSON files read again only when their size or modification time changed."""

    def __init__(self):
        self.cache: dict[Path, tuple[tuple[int, int], object]] = {}

    def read(self, path: Path) -> object:
        """The parsed file, or None when it is missing, unreadable or not JSON."""
        try:
            stat = path.stat()
        except OSError:
            self.cache.pop(path, None)
            return None
        key = (stat.st_mtime_ns, stat.st_size)
        if path in self.cache and self.cache[path][0] == key:
            return self.cache[path][1]
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            value = None
        self.cache[path] = (key, value)
        return value

    def object(self, path: Path) -> dict:
        value = self.read(path)
        return value if isinstance(value, dict) else {}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _numbered(folder: Path) -> list[int]:
    try:
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := ITERATION.fullmatch(p.name)))
    except OSError:
        return []


def iteration_row(run_dir: Path, k: int, files: Files) -> dict:
    """One iteration's key numbers; None where a file or a field is missing."""
    folder = run_dir / f"it{k}"
    metrics, score = files.object(folder / "metrics.json"), files.object(folder / "score.json")
    point = files.object(run_dir / "eval" / "points" / f"it{k}" / "metrics.json").get("metrics")
    row = {key: _number(metrics.get(key, score.get(key))) for key, _, _ in COLUMNS}
    row["iteration"] = k
    row["learning_rate"] = _number(metrics.get("learning_rate", metrics.get("lr")))
    # the flows' convention: sampling and training time, without the stage's model loading
    row["rollout_seconds"] = _number(files.object(folder / "rollout.timings.json").get("sample_seconds"))
    row["train_seconds"] = _number(files.object(folder / "update.timings.json").get("train_seconds"))
    row["eval_reward"] = _number(point.get("reward")) if isinstance(point, dict) else None
    for key in sorted(score):  # each component's mean, where several rewards are combined
        if key.endswith("_mean") and key != "reward_mean":
            row[key] = _number(score[key])
    return row


def read_rows(run_dir: Path, files: Files) -> list[dict]:
    """A row per iteration whose update wrote metrics.json, and per evaluated checkpoint (0: the base)."""
    trained = [k for k in _numbered(run_dir) if k > 0 and (run_dir / f"it{k}" / "metrics.json").exists()]
    evaluated = [k for k in _numbered(run_dir / "eval" / "points")
                 if (run_dir / "eval" / "points" / f"it{k}" / "metrics.json").exists()]
    return [iteration_row(run_dir, k, files) for k in sorted({*trained, *evaluated})]


def read_evaluation(run_dir: Path, files: Files) -> dict | None:
    """The evaluate stage's held-out reward (base, trained, delta, its interval), when written."""
    record = files.read(run_dir / "eval" / "metrics.json")
    return record if isinstance(record, dict) else None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except OSError:  # someone else's process
        return True
    return True


def stage_of(path: Path, run_dir: Path) -> str:
    """The dvc.yaml stage that writes `path`, else the path itself."""
    run_dir = run_dir.resolve()
    try:
        parts = path.relative_to(run_dir).parts
    except ValueError:  # the shared outputs beside the presets' folders: runs/validate, runs/prompts
        shared = path.relative_to(run_dir.parent).parts if path.is_relative_to(run_dir.parent) else ()
        return {"validate": "validate", "prompts": "curate"}.get(shared[0] if shared else "", str(path))
    k = ITERATION.fullmatch(parts[0]) if parts else None
    if k and k.group(1) == "0":
        return "init"
    if k and len(parts) > 1:
        name = {"rollout": "rollout", "scores.parquet": "score", "reward_state.json": "score",
                "checkpoint": "update", "metrics.json": "update"}.get(parts[1], parts[1])
        return f"{name}@{k.group(1)}"
    if parts[:2] == ("eval", "points") and len(parts) > 2:
        return f"eval_checkpoint@{parts[2].removeprefix('it')}"
    return {"eval": "evaluate", "export": "export"}.get(parts[0] if parts else "", "/".join(parts))


def locked_stages(run_dir: Path, files: Files) -> list[tuple[str, object]] | None:
    """(stage, pid) for each output DVC's lock says is being written; None outside a DVC project."""
    for folder in [run_dir.resolve(), *run_dir.resolve().parents]:
        if (folder / ".dvc").is_dir():
            lock = files.object(folder / ".dvc" / "tmp" / "rwlock").get("write")
            entries = lock.items() if isinstance(lock, dict) else ()
            found = {stage_of(Path(p), run_dir): (e.get("pid") if isinstance(e, dict) else None) for p, e in entries}
            return sorted(found.items())
    return None


def next_stage(run_dir: Path, plan: Plan) -> str | None:
    """The first stage whose outputs the files lack (None: the planned run is complete)."""
    done = 0
    while (run_dir / f"it{done + 1}" / "metrics.json").exists():
        done += 1
    if not done and not (run_dir / "it0" / "checkpoint" / "checksums.json").is_file():
        return "init"  # (later, pruning may remove checkpoint 0)
    k, folder = done + 1, run_dir / f"it{done + 1}"
    if plan.iterations is None or k <= plan.iterations:
        if (folder / "scores.parquet").exists():
            return f"update@{k}"
        if (folder / "rollout" / "manifest.json").exists():
            return f"score@{k}"
        if folder.is_dir() or plan.iterations is not None:
            return f"rollout@{k}"
        return f"rollout@{k} (or the evaluation, after the last iteration)"
    for j in plan.eval_at:
        if not (run_dir / "eval" / "points" / f"it{j}" / "metrics.json").exists():
            return f"eval_checkpoint@{j}"
    if not (run_dir / "eval" / "metrics.json").exists():
        return "evaluate"
    if not (run_dir / "export").is_dir():
        return "export"
    return None


def read_status(run_dir: Path, files: Files, plan: Plan) -> dict:
    """What runs now: DVC's lock when it names a stage, else what the files call for."""
    locked, upcoming = locked_stages(run_dir, files), next_stage(run_dir, plan)
    status = {"kind": "status", "stage": None, "next": upcoming}
    if locked:
        stage, pid = locked[0]
        status.update(state="running", stage=stage, pid=pid)
        where = f"pid {pid}" if _alive(pid) else f"pid {pid} is not running here: a stale lock, or another node"
        names = ", ".join(name for name, _ in locked)
        status["text"] = f"running: {names} (DVC lock, {where})"
    elif upcoming is None:
        status.update(state="done", text=f"nothing running: the run is complete ({plan.iterations} iterations, "
                                         f"evaluated, exported)")
    elif locked is None:  # no DVC project above: the files alone
        status.update(state="in_progress", stage=upcoming, text=f"in progress (or next): {upcoming}")
    else:
        status.update(state="idle", text=f"nothing running (no DVC lock); next stage: {upcoming}")
    return status


def columns_of(rows: list[dict]) -> list[tuple[str, str, int]]:
    """The fixed columns, the optional ones some row has, then the reward components."""
    shown = [c for c in COLUMNS if c[0] not in OPTIONAL or any(r.get(c[0]) is not None for r in rows)]
    known = {c[0] for c in COLUMNS}
    extra = sorted({key for row in rows for key in row if key not in known})
    return shown + [(key, key.removesuffix("_mean"), max(10, len(key) - 4)) for key in extra]


def cell(value, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, int):
        text = str(value)
    else:
        text = f"{value:.4g}"
    return text.rjust(width)


def format_header(columns) -> str:
    return " ".join(header.rjust(width) for _, header, width in columns)


def format_row(row: dict, columns) -> str:
    return " ".join(cell(row.get(key), width) for key, _, width in columns)


def format_evaluation(record: dict) -> str:
    base, trained, delta = (_number(record.get(k)) for k in ("base", "trained", "delta"))
    text = (f"held-out reward at iteration {record.get('iteration', '-')}: base {cell(base, 0)}, "
            f"trained {cell(trained, 0)}, delta {'-' if delta is None else f'{delta:+.4g}'}")
    low, high = _number(record.get("ci_low")), _number(record.get("ci_high"))
    return text + (f" (95% interval {low:+.4g} to {high:+.4g})" if low is not None and high is not None else "")


def format_table(rows: list[dict], evaluation: dict | None, status: dict) -> str:
    """The run so far as plain fixed-width text: header, rows, the evaluation, the status line."""
    columns = columns_of(rows)
    lines = [format_header(columns), *(format_row(row, columns) for row in rows)]
    if not rows:
        lines.append("(no finished iteration yet)")
    if evaluation is not None:
        lines.append(format_evaluation(evaluation))
    lines.append(status["text"])
    return "\n".join(lines)


def _json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=False)


class Watcher:
    """A run directory read again on each `lines()` call; yields only what changed since the last."""

    def __init__(self, run_dir: Path, plan: Plan, as_json: bool = False):
        self.run_dir, self.plan, self.as_json = run_dir, plan, as_json
        self.files, self.shown, self.columns = Files(), {}, None

    def lines(self, stamp: str = "") -> list[str]:
        rows = read_rows(self.run_dir, self.files)
        evaluation = read_evaluation(self.run_dir, self.files)
        status = read_status(self.run_dir, self.files, self.plan)
        out = []
        if self.as_json:
            records = [("row", r["iteration"], {"kind": "iteration", **r}) for r in rows]
            if evaluation is not None:
                records.append(("evaluation", 0, {"kind": "evaluation", **evaluation}))
            records.append(("status", 0, status))
            return [line for key, k, record in records if (line := self._changed((key, k), _json_line(record)))]
        columns = columns_of(rows)
        if columns != self.columns:  # first call, or a column appeared: the header again
            self.columns = columns
            out.append(format_header(columns))
            self.shown = {key: line for key, line in self.shown.items() if key[0] != "row"}
        out += [line for r in rows if (line := self._changed(("row", r["iteration"]), format_row(r, columns)))]
        if evaluation is not None and (line := self._changed(("evaluation", 0), format_evaluation(evaluation))):
            out.append(line)
        if line := self._changed(("status", 0), status["text"]):
            out.append(f"{stamp}{line}")
        return out

    def _changed(self, key, line: str) -> str | None:
        if self.shown.get(key) == line:
            return None
        self.shown[key] = line
        return line


def follow(watcher: Watcher, seconds: float, out=None, sleep=time.sleep) -> int:
    """Print what changed every `seconds` until interrupted; Ctrl-C ends it with exit code 0."""
    out = out or sys.stdout
    try:
        while True:
            stamp = "" if watcher.as_json else time.strftime("[%H:%M:%S] ")
            for line in watcher.lines(stamp):
                print(line, file=out, flush=True)
            sleep(seconds)
    except KeyboardInterrupt:
        return 0


def plan_for(run_dir: Path, params_path: Path) -> Plan:
    """The iteration count and evaluated checkpoints, when params.yaml names this run directory."""
    from flash_grpo_core.config import load_params

    try:
        params = load_params(params_path, preset=run_dir.name)
        if (Path(params.pipeline.root) / params.preset).resolve() != run_dir.resolve():
            return Plan()
    except Exception:  # noqa: BLE001 - no plan is a fine answer: the rows do not need one
        return Plan()
    return Plan(params.iterations, tuple(params.pipeline.eval_at))


def default_run_dir(params_path: Path) -> Path:
    from flash_grpo_core.config import load_params

    params = load_params(params_path)
    return Path(params.pipeline.root) / params.preset


def main(argv=None, sleep=time.sleep) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_grpo_core.pipeline.watch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="e.g. runs/tiny (default: params.yaml's root/preset)")
    parser.add_argument("--follow", nargs="?", type=float, const=10.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 10) until Ctrl-C, printing what changed")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of the table")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.follow is not None and args.follow <= 0:
        parser.error("--follow takes a positive number of seconds")
    try:
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(Path(args.params))
    except Exception as error:  # noqa: BLE001 - one line, whatever kept the params from loading
        print(f"watch: error: cannot read the run directory from {args.params}: {error}", file=sys.stderr)
        return 2
    if not run_dir.is_dir():
        print(f"watch: error: no run directory at {run_dir}", file=sys.stderr)
        return 2
    watcher = Watcher(run_dir, plan_for(run_dir, Path(args.params)), args.json)
    if args.follow is not None:
        return follow(watcher, args.follow, sleep=sleep)
    if args.json:
        print("\n".join(watcher.lines()))
    else:
        f = watcher.files
        print(format_table(read_rows(run_dir, f), read_evaluation(run_dir, f), read_status(run_dir, f, watcher.plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
