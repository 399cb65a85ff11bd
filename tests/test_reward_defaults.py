"""The Wan presets train on the authors' reward (HPSv3), and a reward that cannot run stops a run
before any model is loaded, naming the setting to fix."""

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from flash_grpo_core.config import ConfigError, load_params, params_from_dict
from flash_grpo_core.rewards import check_reward_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["wan1_3b", "wan14b"])
def test_wan_presets_train_on_hpsv3_with_local_paths(preset):
    params = load_params(ROOT / "params.yaml", preset=preset)
    assert dict(params.reward.weights) == {"hpsv3": 1.0}
    options = params.reward.options["hpsv3"]
    assert options["path"] and options["base_path"] and options["dtype"] == "auto"
    # aggregate / top_fraction / jpeg keep HPSv3Reward's defaults, the authors' (test_reward_models)
    assert not {"aggregate", "top_fraction", "jpeg"} & set(options)


def _raw():
    return YAML(typ="safe", pure=True).load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(("options", "missing"), [
    ({"hpsv3": {"base_path": "models/Qwen2-VL-7B-Instruct"}}, "reward.options.hpsv3.path"),
    ({"hpsv3": {"path": "models/HPSv3", "base_path": None}}, "reward.options.hpsv3.base_path"),
    ({}, "reward.options.hpsv3.path"),
])
def test_hpsv3_without_its_paths_is_a_config_error(options, missing):
    with pytest.raises(ConfigError, match=rf"needs {missing} in params.yaml .*flash_grpo_core.rewards.server"):
        check_reward_params(params_from_dict(_raw(), "wan1_3b", {"reward.options": options}).reward)


def test_a_remote_reward_without_its_url_is_a_config_error():
    with pytest.raises(ConfigError, match=r"needs reward.options.remote.url in params.yaml \(the reward server"):
        check_reward_params(params_from_dict(_raw(), "tiny", {"reward.weights": {"remote": 1.0},
                                                              "reward.options": {"remote": {"name": "x"}}}).reward)


def test_rollout_names_a_missing_reward_model_before_loading_anything(tmp_path, monkeypatch, capsys):
    """A missing HPSv3 file fails the rollout stage at once (exit 2), not the score stage after a
    rollout's GPU hours."""
    from flash_grpo_core.artifacts import checkpoint
    from stages import rollout
    from stages.runtime import common

    raw = _raw()
    raw["preset"] = "tiny"
    missing = tmp_path / "nowhere" / "HPSv3.safetensors"
    raw["reward"] = {"weights": {"hpsv3": 1.0},
                     "options": {"hpsv3": {"path": str(missing), "base_path": str(tmp_path)}}}
    params = tmp_path / "params.yaml"
    YAML(typ="safe", pure=True).dump(raw, params)
    prompts = tmp_path / "train.parquet"
    from flash_grpo_core.artifacts.prompts import Prompt, write_prompts_parquet

    write_prompts_parquet([Prompt(id=f"p{i}", prompt=f"a red square {i}", source="test", words=4) for i in range(8)],
                          prompts)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the reward was checked")

    monkeypatch.setattr(checkpoint, "check_config", lambda *args: None)
    monkeypatch.setattr(common, "engine_at", no_model)
    code = rollout.main(["--params", str(params), "--iteration", "1", "--prompts", str(prompts),
                         "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "reward.options.hpsv3.path" in err and str(missing) in err and "does not exist" in err
    assert not (tmp_path / "out").exists()
