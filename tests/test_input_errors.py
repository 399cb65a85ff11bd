"""Deterministic input errors end in exit code 2 and one line naming the key or file, before any
compute: an orchestrator retries exit 1, and an error found after the rollout wastes it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from fakes import params_file
from flash_grpo_core.config import ConfigError
from flash_grpo_core.pipeline.workspace import tool_env

ROOT = Path(__file__).resolve().parents[1]
_params_file = params_file


def _module(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=tool_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, check=False, timeout=300)


def _one_line(result, prefix: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(prefix), result.stderr[-2000:]
    return lines[0]


def test_a_video_larger_than_the_models_positions_is_refused_before_sampling(tmp_path):
    """rollout.frames 161 on the tiny model: 41 latent frames, its rope table has 32 positions."""
    params = _params_file(tmp_path, presets__tiny__rollout__frames=161)
    line = _one_line(_module("flash_grpo_core.__main__", "--params", params, "--iterations", "1",
                             "--prompts", ROOT / "prompts" / "toy.jsonl"), "run: error: ")
    assert "rollout.frames 161 gives 41 patches" in line and "rope_max_seq_len" in line


def test_the_size_check_names_each_axis(tiny_params):
    from flash_grpo_core.engine.iteration import _check_fits

    _check_fits("rollout.height", 32, 4, 2, 32)  # fits: no error
    with pytest.raises(ConfigError, match="rollout.height 48 gives 3 latent positions, not a multiple"):
        _check_fits("rollout.height", 48, 3, 2, 32)
    with pytest.raises(ConfigError, match="rollout.width 1056 gives 33 patches, more than the 32"):
        _check_fits("rollout.width", 1056, 66, 2, 32)


@pytest.mark.parametrize(("source", "expected"), [
    ("", "no train prompts left"),
    ("a single prompt about a cat\n", "0 eval prompts"),
])
def test_a_curation_with_too_few_prompts_fails_and_writes_nothing(tmp_path, source, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(source)
    out = tmp_path / "out"
    line = _one_line(_module("stages.curate", "--sources", prompts, "--out-dir", out,
                             "--params", _params_file(tmp_path)), "curate: error: ")
    assert expected in line and str(prompts) in line
    assert not out.exists()


def test_iterations_out_of_step_with_the_loop_shows_the_hint_at_the_first_stage(tmp_path):
    """DVC stops at a missing it<N> path before any stage that could explain it; validate, first in
    the pipeline and rerun on any edit of params.yaml, shows the config's own hint instead (and
    curate, run by hand, too)."""
    params = _params_file(tmp_path, iterations=9)
    line = _one_line(_module("stages.validate", "--params", params, "--out", tmp_path / "v" / "valid.json",
                             "--sources", tmp_path / "v" / "sources.json"), "validate: error: ")
    assert "python -m flash_grpo_core.pipeline.iterations 9" in line and not (tmp_path / "v").exists()
    line = _one_line(_module("stages.curate", "--sources", ROOT / "prompts" / "toy.jsonl", "--out-dir", tmp_path / "o",
                             "--params", params), "curate: error: ")
    assert "python -m flash_grpo_core.pipeline.iterations 9" in line
    stages = YAML(typ="safe", pure=True).load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "params.yaml" in stages["validate"]["deps"] and "eval.num_prompts" in stages["curate"]["params"]


def test_setting_iterations_on_a_broken_params_file_names_it_and_leaves_it(tmp_path):
    params = _params_file(tmp_path, train__learning_rate=-1)
    before = params.read_bytes()
    line = _one_line(_module("flash_grpo_core.pipeline.iterations", "3", "--params", params), "iterations: error: ")
    assert line.startswith(f"iterations: error: {params}: train.learning_rate must be > 0")
    assert params.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_wrong_schema_prompts_parquet_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flash_grpo_core.artifacts.prompt_sources import PromptFileError
    from flash_grpo_core.artifacts.prompts import read_prompts_parquet

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a cat"]}), path)
    with pytest.raises(PromptFileError, match=f"cannot read curated prompts {path}: .*rerun the curate stage"):
        read_prompts_parquet(path)
    with pytest.raises(PromptFileError, match="missing.parquet"):
        read_prompts_parquet(tmp_path / "missing.parquet")


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"iteration": 1})])
def test_a_missing_or_wrong_rollout_manifest_is_named(tmp_path, content):
    from flash_grpo_core.artifacts.tar_io import ShardError
    from stages.update import read_manifest

    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ShardError, match=f"manifest {tmp_path / 'manifest.json'}: .*rerun its rollout stage"):
        read_manifest(str(tmp_path))


def test_the_update_stage_reads_the_manifest_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from flash_grpo_core.artifacts import checkpoint
    from stages import update
    from stages.runtime import common

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the manifest was read")

    monkeypatch.setattr(checkpoint, "check_config", lambda *args: None)
    monkeypatch.setattr(common, "engine_at", no_model)
    code = update.main(["--params", str(_params_file(tmp_path)), "--iteration", "1", "--checkpoint", "ckpt",
                        "--rollout", str(tmp_path / "rollout"), "--scores", "s.parquet", "--out", str(tmp_path / "o"),
                        "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and "manifest" in err and str(tmp_path / "rollout") in err, err


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model.device": "tpu"}, "model.device must be auto, cpu, cuda or cuda:<index>, got 'tpu'"),
    ({"rollout.height": 0}, "rollout.height, rollout.width and rollout.frames must be > 0"),
    ({"rollout.noise_level": -1.0}, "rollout.noise_level must be null"),
    ({"train.weight_decay": -0.1}, "train.weight_decay must be >= 0"),
    ({"eval.guidance": float("nan")}, "eval.guidance must be a finite number"),
    ({"rollout.guidance": float("nan")}, "rollout.guidance must be a finite number"),
])
def test_values_that_failed_deep_in_a_stage_are_config_errors(overrides, message):
    from flash_grpo_core.config import params_from_dict

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        params_from_dict({}, "tiny", overrides)


def test_a_params_file_that_is_not_a_mapping_is_named(tmp_path):
    from flash_grpo_core.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=f"{path}: the params file must be a mapping of sections, got a list"):
        load_params(path)


@pytest.mark.parametrize("content", [None, "{broken", "[1, 2]", '{"guards": {"brightness": {"history": [NaN]}}}',
                                     '{"guards": {"brightness": {"history": [1e999]}}}'])
def test_a_broken_reward_state_or_eval_point_is_named(tmp_path, content):
    from flash_grpo_core.artifacts.atomic import read_json_object
    from flash_grpo_core.artifacts.checkpoint import CheckpointError
    from flash_grpo_core.rewards import RewardError
    from stages.evaluate import read_point

    state = tmp_path / "reward_state.json"
    point = tmp_path / "points" / "it1" / "metrics.json"
    point.parent.mkdir(parents=True)
    for path in (state, point):
        if content is not None:
            path.write_text(content)
    with pytest.raises(RewardError, match=f"{state}.*rerun the stage"):
        read_json_object(state, RewardError, "rerun the stage that wrote it")
    if content is not None:  # a missing point has its own message (the stage to run)
        with pytest.raises(CheckpointError, match=f"{point}.*eval_checkpoint@1"):
            read_point(tmp_path / "points", 1)


def test_the_reward_server_names_an_unknown_reward():
    line = _one_line(_module("flash_grpo_core.rewards.server", "--reward", "no_such", "--port", "0"), "reward server: ")
    assert "unknown reward 'no_such'" in line
