"""Corruptions of bench/faults/run.py: every artifact type damaged five ways, then detected and repaired.

Each case starts from the reference state and damages one output file:
- `truncate`: its first half kept;
- `flip data`: one byte XOR 0x01 where the content is: a tensor's last byte (safetensors), the
  middle of the file (parquet's column pages), the first member's bytes (tar), the middle one of
  its digits (JSON: still valid JSON, another number);
- `flip header`: one byte XOR 0x01 in the format's metadata: the JSON header (safetensors), the
  footer with the schema and row groups (parquet), the first member's header block (tar), the
  opening brace (JSON);
- `delete`;
- `replace`: a valid file of the same type with other content (another iteration's, the other shard).
Then: does DVC see it (`dvc status <producer>` lists the output as changed), does the stage that
reads it, run directly on it (its dvc.lock command, outputs redirected), exit with code 2 and a
first stderr line `<stage>: error: ...` naming the file, and does a following `dvc repro` (or, if
that is not enough, `dvc checkout --force` and `dvc repro`) end with the reference's bytes?
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bench.faults.workspace import Workspace

IT1, IT2, EVAL = "runs/tiny/it1", "runs/tiny/it2", "runs/tiny/eval"


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the project
    reader: str | None  # the stage that reads it (None: no stage reads it; DVC alone guards it)
    other: str  # a valid file of the same type with other content


ARTIFACTS = [
    Artifact("runs/prompts/train.parquet", "rollout@1", "runs/prompts/eval.parquet"),
    Artifact(f"{IT1}/rollout/shard-000000.tar", "score@1", f"{IT1}/rollout/shard-000001.tar"),
    Artifact(f"{IT1}/rollout/video-000001.tar", "score@1", f"{IT1}/rollout/video-000000.tar"),
    Artifact(f"{IT1}/rollout/prompt_embeds.safetensors", "update@1", f"{IT2}/rollout/prompt_embeds.safetensors"),
    Artifact(f"{IT1}/rollout/shards.json", "score@1", f"{IT2}/rollout/shards.json"),
    Artifact(f"{IT1}/rollout/manifest.json", "update@1", f"{IT2}/rollout/manifest.json"),
    Artifact(f"{IT1}/scores.parquet", "update@1", f"{IT2}/scores.parquet"),
    Artifact(f"{IT1}/reward_state.json", "score@2", f"{IT2}/reward_state.json"),
    Artifact(f"{IT1}/checkpoint/trainable.safetensors", "rollout@2", f"{IT2}/checkpoint/trainable.safetensors"),
    Artifact(f"{IT1}/checkpoint/ema.safetensors", "eval_checkpoint@1", f"{IT2}/checkpoint/ema.safetensors"),
    Artifact(f"{IT1}/checkpoint/optimizer.safetensors", "update@2", f"{IT2}/checkpoint/optimizer.safetensors"),
    Artifact(f"{IT2}/checkpoint/state.json", "export", f"{IT1}/checkpoint/state.json"),
    Artifact(f"{IT2}/checkpoint/checksums.json", "evaluate", f"{IT1}/checkpoint/checksums.json"),
    Artifact(f"{EVAL}/points/it2/videos.safetensors", "evaluate", f"{EVAL}/points/it1/videos.safetensors"),
    Artifact(f"{EVAL}/points/it1/metrics.json", "evaluate", f"{EVAL}/points/it0/metrics.json"),
    Artifact(f"{IT1}/metrics.json", None, f"{IT2}/metrics.json"),
]
KINDS = ("truncate", "flip data", "flip header", "delete", "replace")
FULL = [(artifact, kind) for artifact in ARTIFACTS for kind in KINDS]
SMALL = [(artifact, kind) for artifact in ARTIFACTS for path, kind in (
    (f"{IT1}/rollout/shard-000000.tar", "truncate"), (f"{IT1}/scores.parquet", "flip data"),
    ("runs/prompts/train.parquet", "replace")) if artifact.path == path]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def data_offset(path: Path) -> int:
    data = path.read_bytes()
    suffix = path.suffix
    if suffix == ".safetensors":
        return len(data) - 1
    if suffix == ".parquet":
        return len(data) // 2
    if suffix == ".tar":
        return 512 + 20  # the first member's content follows its 512-byte header
    digits = [match.start() for match in re.finditer(rb"[0-9]", data)]  # JSON
    return digits[len(digits) // 2]


def header_offset(path: Path) -> int:
    suffix = path.suffix
    if suffix == ".safetensors":
        return 9  # inside the JSON header, after its 8-byte length and the opening brace
    if suffix == ".parquet":
        return path.stat().st_size - 10  # the footer's metadata, before its length and the magic
    return 0  # a tar member's name (covered by its header checksum); JSON's opening brace


def corrupt(project: Path, artifact: Artifact, kind: str) -> None:
    path = project / artifact.path
    path.chmod(0o644)
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "flip data":
        _flip(path, data_offset(path))
    elif kind == "flip header":
        _flip(path, header_offset(path))
    elif kind == "delete":
        path.unlink()
    else:
        path.write_bytes((project / artifact.other).read_bytes())


def dvc_sees(workspace: Workspace, path: str) -> bool:
    """Whether `dvc status` of the file's producer lists the output holding it as changed."""
    stage = workspace.producer(path)
    changed = [out for entry in workspace.status(stage).get(stage, []) if isinstance(entry, dict)
               for out in entry.get("changed outs", {})]
    return any(path == out or path.startswith(out + "/") for out in changed)


def reader_verdict(workspace: Workspace, artifact: Artifact) -> dict:
    """The reading stage run directly on the damaged file: exit code, first stderr line, whether that
    is a clear one-line error naming the file (exit code 2, no traceback), and whether it succeeded
    with outputs other than the reference's (`reader_silent`: the damage went into its results;
    success with the reference's outputs means the damaged bytes were ones it does not use)."""
    if artifact.reader is None:
        return {"reader": None, "reader_exit": None, "reader_first_line": "", "reader_last_line": "",
                "reader_named": False, "reader_silent": False}
    result, same_outputs = workspace.run_stage(artifact.reader)
    name = artifact.reader.split("@")[0]
    line = result.first_error_line
    named = (result.code == 2 and line.startswith(f"{name}: error") and Path(artifact.path).name in line
             and "Traceback" not in result.stderr)
    return {"reader": artifact.reader, "reader_exit": result.code, "reader_first_line": workspace.scrub(line)[:300],
            "reader_last_line": workspace.scrub(result.last_error_line)[:300],
            "reader_named": named, "reader_silent": result.code == 0 and not same_outputs}


def repair(workspace: Workspace) -> str | None:
    """`dvc repro`, and if the bytes are still not the reference's, `dvc checkout --force` and
    `dvc repro`; which of them ended correct (None: neither)."""
    for steps in ([workspace.repro_args()], [["checkout", "--force"], workspace.repro_args()]):
        for step in steps:
            workspace.dvc(*step)
        found = workspace.compare()
        if not any(found.values()) and not workspace.status():
            return " + ".join(f"dvc {' '.join(step)}" for step in steps)
    return None


def run_corruption(workspace: Workspace, artifact: Artifact, kind: str) -> dict:
    workspace.restore()
    corrupt(workspace.project, artifact, kind)
    seen = dvc_sees(workspace, artifact.path)
    verdict = reader_verdict(workspace, artifact)
    repaired_by = repair(workspace)
    detected = seen or verdict["reader_named"]
    return {"case": f"{artifact.path}: {kind}", "artifact": artifact.path, "kind": kind, "dvc_detected": seen,
            **verdict, "detected_named": detected, "repaired_by": repaired_by,
            "ended_correct": repaired_by is not None}
