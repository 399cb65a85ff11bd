"""Artifact integrity: checksums on every artifact a stage reads, no debris from killed writes, a DVC
cache that edits of outputs cannot poison, and a lock that identical reruns leave unchanged."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_grpo_core.artifacts import atomic
from flash_grpo_core.artifacts.checkpoint import (
    CheckpointError,
    CheckpointTensors,
    check_config,
    config_record,
    read_checkpoint,
    read_state,
    write_checkpoint,
)
from flash_grpo_core.artifacts.checksums import write_index
from flash_grpo_core.artifacts.prompt_embeds import load_prompt_embeds, save_prompt_embeds
from flash_grpo_core.artifacts.safetensors_io import write_safetensors
from flash_grpo_core.artifacts.scores import ScoresError, read_scores, write_scores
from flash_grpo_core.artifacts.tar_io import ShardError
from flash_grpo_core.config import load_params
from flash_grpo_core.pipeline.workspace import copy_project, tool_env
from warm_runner import warm_runner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin: after the 8-byte length and the JSON header."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# -- checkpoints -------------------------------------------------------------------------------

@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml", preset="tiny")  # LoRA: its settings are recorded too


@pytest.fixture
def checkpoint(tmp_path, params):
    weights = {"blocks.0.attn.lora_A": torch.arange(12.0).reshape(3, 4)}
    tensors = CheckpointTensors(weights, {k: v + 1 for k, v in weights.items()},
                                {"blocks.0.attn.lora_A::step": torch.tensor(3.0)}, ema_steps=3)
    return write_checkpoint(tensors, tmp_path / "checkpoint", {"iteration": 1, "config": config_record(params)})


def test_a_checkpoint_reads_back_and_lists_its_checksums(checkpoint):
    tensors, state = read_checkpoint(checkpoint)
    assert state["iteration"] == 1 and tensors.ema_steps == 3
    assert set(json.loads((checkpoint / "checksums.json").read_text())["files"]) == {
        "trainable.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}


@pytest.mark.parametrize("damage", ["flip data", "truncate", "break header"])
def test_a_damaged_checkpoint_file_is_named(checkpoint, damage):
    path = checkpoint / "trainable.safetensors"
    if damage == "flip data":  # a float's byte: a valid file with another weight, accepted before
        _flip(path, path.stat().st_size - 2)
    elif damage == "truncate":
        _truncate(path)
    else:
        _flip(path, 9)
    with pytest.raises(CheckpointError, match="trainable.safetensors"):
        read_checkpoint(checkpoint)


def test_a_corrupt_state_json_is_a_checkpoint_error_naming_it(checkpoint):
    state = checkpoint / "state.json"
    state.write_text(state.read_text()[:-10])
    with pytest.raises(CheckpointError, match="state.json"):
        read_state(checkpoint)
    write_index(checkpoint, ["trainable.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"])
    with pytest.raises(CheckpointError, match=r"state.json: not a readable checkpoint state"):
        read_state(checkpoint)  # checksums agree: the JSON error itself is named, not a JSONDecodeError


def test_a_checkpoint_without_its_checksums_reads_as_unfinished(checkpoint):
    (checkpoint / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="has no checksums.json"):
        read_checkpoint(checkpoint)


def test_a_checkpoint_of_other_params_is_refused_naming_both_values(checkpoint, params):
    assert check_config(checkpoint, params)["iteration"] == 1
    other = dataclasses.replace(params, seed=params.seed + 7)
    with pytest.raises(CheckpointError, match=rf"seed: {params.seed} in the checkpoint, {params.seed + 7} in the"):
        check_config(checkpoint, other)
    rank = dataclasses.replace(params, model=dataclasses.replace(params.model, lora_rank=3))
    with pytest.raises(CheckpointError, match=r"model.lora_rank: \d+ in the checkpoint, 3 in the params"):
        check_config(checkpoint, rank)


# -- single safetensors files: eval videos, prompt embeddings ---------------------------------

def _damage_safetensors(path: Path, damage: str) -> None:
    if damage == "flip data":
        _flip(path, path.stat().st_size - 1)
    elif damage == "flip metadata":  # inside the metadata's JSON text: still a valid header
        _flip(path, path.read_bytes().index(b"red square"))
    elif damage == "truncate":
        _truncate(path)
    else:
        _flip(path, 9)


DAMAGES = ["flip data", "flip metadata", "truncate", "break header"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_eval_videos_are_named(tmp_path, damage):
    from stages.evaluate import read_videos

    path = tmp_path / "it1" / "videos.safetensors"
    write_safetensors({"videos": torch.randint(0, 255, (2, 3, 4, 4, 3), dtype=torch.uint8)}, path,
                      {"prompt_ids": ["a", "b"], "prompts": ["a red square", "a blue one"]})
    assert read_videos(tmp_path, 1)[1] == ["a red square", "a blue one"]
    _damage_safetensors(path, damage)
    with pytest.raises(CheckpointError, match="videos.safetensors"):
        read_videos(tmp_path, 1)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_prompt_embeddings_are_named(tmp_path, damage):
    prompts = ["a red square", "a blue one"]
    save_prompt_embeds(tmp_path, prompts, torch.randn(2, 5, 8, dtype=torch.bfloat16), None)
    assert load_prompt_embeds(tmp_path, prompts)[0].shape == (2, 5, 8)
    _damage_safetensors(tmp_path / "prompt_embeds.safetensors", damage)
    with pytest.raises(ShardError, match="prompt_embeds.safetensors"):
        load_prompt_embeds(tmp_path, prompts)


# -- scores.parquet ---------------------------------------------------------------------------

@pytest.fixture
def scores(tmp_path):
    records = [_Record(f"it0001-p000000-g{g:02d}", g) for g in range(4)]
    path = tmp_path / "scores.parquet"
    write_scores(path, records, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([-1.5, -0.5, 0.5, 1.5]),
                 {"clip": torch.tensor([0.5, 0.6, 0.7, 0.8])})
    return path


@dataclasses.dataclass
class _Record:
    key: str
    group_index: int
    prompt_id: str = "p0"
    iteration: int = 1


def _every_flip_is_caught_or_harmless(path: Path, read, error: type[Exception]) -> None:
    """Each single flipped byte of `path` reads as before or fails with `error` naming the file; most fail."""
    original, data = read(path), path.read_bytes()
    caught = 0
    for offset in range(len(data)):
        _flip(path, offset)
        try:
            assert read(path) == original, f"byte {offset}: other content read without an error"
        except error as raised:
            assert str(path) in str(raised)
            caught += 1
        path.write_bytes(data)
    assert caught > len(data) // 2


def test_every_flipped_byte_of_a_scores_table_is_caught_or_harmless(scores):
    """No single flipped byte may give other numbers silently: the read fails naming the file, or it
    reads the same columns (a byte of the footer's statistics, say)."""
    _every_flip_is_caught_or_harmless(scores, read_scores, ScoresError)


@pytest.mark.parametrize("damage", ["truncate", "break footer"])
def test_a_truncated_or_footless_scores_table_is_named(scores, damage):
    """Parquet's header is its footer (the leading magic is not read: the test above covers it)."""
    _truncate(scores) if damage == "truncate" else _flip(scores, scores.stat().st_size - 6)
    with pytest.raises(ScoresError, match="scores.parquet"):
        read_scores(scores)


# -- curated prompt parquets ------------------------------------------------------------------

def test_every_flipped_byte_of_a_prompts_table_is_caught_or_harmless(tmp_path):
    """The curated prompts carry their columns' sha256 like the scores: a flipped byte gives the
    same prompts or an error naming the file, never other prompts."""
    from flash_grpo_core.artifacts.prompt_sources import PromptFileError
    from flash_grpo_core.artifacts.prompts import Prompt, read_prompts_parquet, write_prompts_parquet

    path = tmp_path / "train.parquet"
    write_prompts_parquet([Prompt(id=f"p{i:02d}", prompt=f"a red square moving left {i}", source="toy", words=6)
                           for i in range(6)], path)
    _every_flip_is_caught_or_harmless(path, read_prompts_parquet, PromptFileError)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p0"], "prompt": ["a cat"], "source": ["x"], "words": pa.array([2], pa.int32())}),
                   path)  # the curated schema, but written without the digest
    with pytest.raises(PromptFileError, match="none stored"):
        read_prompts_parquet(path)


# -- debris of interrupted writes --------------------------------------------------------------

def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic.atomic_path(tmp_path / "metrics.json") as temporary:
        temporary.write_text("{")
        raise RuntimeError("killed midway")
    with pytest.raises(RuntimeError), atomic.atomic_directory(tmp_path / "checkpoint") as staging:
        (staging / "state.json").write_text("{")
        raise RuntimeError("killed midway")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writes_temporaries_go_with_the_next_write(tmp_path):
    """A SIGKILL runs no clean-up: what it left (this naming and the earlier mkdtemp one) must not
    outlive the next write of the same output, while other outputs' temporaries stay."""
    stale = [tmp_path / ".metrics.json.0123456789ab.tmp", tmp_path / ".checkpoint.0123456789ab.tmp",
             tmp_path / ".checkpoint.k2j4_x9q.tmp", tmp_path / ".checkpoint.old-ab12cd34",
             tmp_path / ".checkpoint.ba9876543210.old"]
    stale[0].write_text("{")
    for folder in stale[1:]:
        folder.mkdir()
        (folder / "trainable.safetensors").write_bytes(b"half")
    other = tmp_path / ".metrics.json.old.0123456789ab.tmp"  # another output's (metrics.json.old) write
    other.write_text("{")
    atomic.write_json({"reward": 1.0}, tmp_path / "metrics.json")
    with atomic.atomic_directory(tmp_path / "checkpoint") as staging:
        (staging / "state.json").write_text("{}")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["metrics.json", "checkpoint", other.name])


# -- the pipeline: a stage on damaged inputs, the DVC cache, the lock --------------------------

def _run(args, cwd, check=True):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=tool_env(), capture_output=True, text=True,
                            check=False)
    if check and result.returncode:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, dvc_cache):
    project = copy_project(ROOT, tmp_path_factory.mktemp("integrity"), cache_dir=dvc_cache)
    params = project / "params.yaml"  # the tiny preset, whatever the checkout's default
    params.write_text(re.sub(r"(?m)^preset: *\w+", "preset: tiny", params.read_text()))
    with warm_runner(project):  # the stages fork from one warm process (tests/warm_runner.py)
        _run([BIN / "dvc", "repro", "curate"], project)
        yield project


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _lock_entry(project: Path, stage: str) -> dict:
    from flash_grpo_core.config import read_yaml

    return read_yaml(project / "dvc.lock")["stages"][stage]


@pytest.mark.slow
def test_an_output_edited_in_place_leaves_its_cache_object_intact(workspace, dvc_cache):
    """With links (the old cache.type) truncating an output truncated the cache object under its md5."""
    out = next(o for o in _lock_entry(workspace, "curate")["outs"] if o["path"].endswith("train.parquet"))
    cached = dvc_cache / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
    output = workspace / out["path"]
    output.chmod(0o644)
    with open(output, "r+b") as handle:
        handle.truncate(10)
    assert md5(cached) == out["md5"]
    assert "modified" in _run([BIN / "dvc", "status", "curate"], workspace).stdout
    _run([BIN / "dvc", "checkout", "--force", out["path"]], workspace)
    assert md5(output) == out["md5"]


@pytest.mark.slow
def test_the_cache_verifier_names_a_corrupt_object(workspace, dvc_cache):
    verify = [sys.executable, ROOT / "scripts" / "verify_cache.py"]  # finds the cache DVC uses: dvc_cache
    assert _run(verify, workspace).returncode == 0
    objects = sorted((dvc_cache / "files" / "md5").glob("??/*"))
    victim = next(path for path in objects if not path.name.endswith(".dir"))
    data = victim.read_bytes()
    victim.chmod(0o644)
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    try:
        result = _run(verify, workspace, check=False)
        assert result.returncode == 2 and str(victim) in result.stderr
        assert result.stderr.count("bad object") == 1
    finally:
        victim.write_bytes(data)


@pytest.mark.slow
def test_a_forced_rerun_of_a_rollout_gives_the_same_lock_entry(workspace):
    _run([BIN / "dvc", "repro", "rollout@1"], workspace)
    first = _lock_entry(workspace, "rollout@1")
    _run([BIN / "dvc", "repro", "-f", "-s", "rollout@1"], workspace)
    assert _lock_entry(workspace, "rollout@1") == first
    manifest = json.loads((workspace / "runs/tiny/it1/rollout/manifest.json").read_text())
    assert not [key for key in manifest if key.endswith("_seconds")]
    assert "sample_seconds" in json.loads((workspace / "runs/tiny/it1/rollout.timings.json").read_text())


def _stage(project: Path, *args, params: str = "params.yaml"):
    return _run([sys.executable, "-m", "stages.eval_checkpoint", "--params", params, "--iteration", "0",
                 "--prompts", "runs/prompts/eval.parquet", "--metrics", "x/metrics.json",
                 "--videos", "x/videos.safetensors", *args], project, check=False)


@pytest.mark.slow
def test_a_stage_on_bad_inputs_exits_2_with_one_line(workspace):
    """Runs after the rollout test: it0's checkpoint exists."""
    text = (workspace / "params.yaml").read_text()
    (workspace / "many.yaml").write_text(text.replace("      num_steps: 20\n      num_prompts: 2\n",
                                                      "      num_steps: 20\n      num_prompts: 50\n"))
    result = _stage(workspace, "--checkpoint", "runs/tiny/it0/checkpoint", params="many.yaml")
    assert result.returncode == 2 and "eval.num_prompts: 50" in result.stderr
    (workspace / "seed.yaml").write_text(text.replace("\nseed: 0\n", "\nseed: 5\n"))
    result = _stage(workspace, "--checkpoint", "runs/tiny/it0/checkpoint", params="seed.yaml")
    assert result.returncode == 2 and "seed: 0 in the checkpoint, 5 in the params" in result.stderr
    corrupt = workspace / "corrupt"
    subprocess.run(["cp", "-r", workspace / "runs/tiny/it0/checkpoint", corrupt], check=True)
    os.chmod(corrupt / "trainable.safetensors", 0o644)
    _flip(corrupt / "trainable.safetensors", _data_offset(corrupt / "trainable.safetensors") + 5)
    result = _stage(workspace, "--checkpoint", corrupt)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "corrupt/trainable.safetensors" in lines[0], result.stderr


@pytest.mark.slow
def test_the_toy_base_stage_is_not_reported_changed_on_a_fresh_copy(workspace):
    """Its outputs are the base shipped in git and it is frozen: neither missing outputs under runs/
    nor a change anywhere in the core it depends on make plain `dvc status` list it."""
    status = _run([BIN / "dvc", "status", "bench/toy/dvc.yaml"], workspace)
    assert "up to date" in status.stdout and "pretrain:" not in status.stdout, status.stdout
    model = workspace / "flash_grpo_core" / "tasks" / "toy" / "model.py"
    model.write_text(model.read_text() + "\n")
    try:
        assert "pretrain:" not in _run([BIN / "dvc", "status"], workspace).stdout
    finally:
        _run(["git", "checkout", "flash_grpo_core/tasks/toy/"], workspace)
