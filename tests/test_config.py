from pathlib import Path

import pytest

from flash_grpo_core.config import ConfigError, load_params, params_from_dict, read_yaml

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load_for_every_preset(tmp_path):
    tiny = load_params(ROOT / "params.yaml", preset="tiny")
    assert tiny.preset == "tiny" and tiny.rollout.height == 32 and tiny.rollout.num_steps == 20
    wan = load_params(ROOT / "params.yaml", preset="wan14b")
    assert wan.rollout.height == 480 and wan.model.path.endswith("14B-Diffusers")


def test_yaml_1_2_reads_exponents_as_numbers(tmp_path):
    params = load_params(_write(tmp_path, "train:\n  learning_rate: 3e-05\n"))
    assert params.train.learning_rate == pytest.approx(3e-5)


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train\.learnig_rate.*known keys of train"):
        load_params(_write(tmp_path, "train:\n  learnig_rate: 1.0e-4\n"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) rolout"):
        load_params(_write(tmp_path, "rolout: {}\n"))


def test_wrong_types_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.learning_rate must be a number"):
        load_params(_write(tmp_path, "train:\n  learning_rate: fast\n"))
    with pytest.raises(ConfigError, match="rollout.iso_temporal must be true/false"):
        load_params(_write(tmp_path, "rollout:\n  iso_temporal: 1\n"))


def test_impossible_combinations_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match=r"num_candidates \(K=30\) must be between 1 and num_steps \(N=20\)"):
        params_from_dict({"rollout": {"num_candidates": 30}})
    with pytest.raises(ConfigError, match=r"minibatches \(3\) must divide the 64 samples"):
        params_from_dict({"train": {"minibatches": 3}})
    with pytest.raises(ConfigError, match="window_size .* must be <= rollout.num_candidates"):
        params_from_dict({"train": {"mode": "window_k", "window_size": 12}})
    with pytest.raises(ConfigError, match=r"window_size \(20\) must be <= rollout.num_steps - 1 \(19\)"):
        params_from_dict({"train": {"mode": "window", "window_size": 20}})
    with pytest.raises(ConfigError, match=r"trains int\(20 x 0.01\) = 0 steps"):
        params_from_dict({"train": {"mode": "full", "timestep_fraction": 0.01}})
    with pytest.raises(ConfigError, match="frames - 1 must be divisible by 4"):
        params_from_dict({"rollout": {"frames": 10}})
    with pytest.raises(ConfigError, match="preset wan1_3b loads Wan 2.1 weights: set presets.wan1_3b.model.path"):
        params_from_dict({"preset": "wan1_3b"})


def test_window_mode_is_mixgrpo_over_all_but_the_last_step():
    # MixGRPO's window slides over steps 0..N-2, not flash's first K: a 12-step window fits N = 20
    params = params_from_dict({"train": {"mode": "window", "window_size": 12}})
    assert params.train.window_size == 12
    # MixGRPO's published defaults: W 4, moved by 1 step every 25 iterations
    defaults = params_from_dict(read_yaml(ROOT / "params.yaml")).train
    assert (defaults.window_size, defaults.window_stride, defaults.window_every) == (4, 1, 25)


def test_overrides_win_over_the_preset():
    raw = read_yaml(ROOT / "params.yaml")
    params = params_from_dict(raw, preset="tiny", overrides={"rollout.group_size": 2, "train.mode": "full"})
    assert params.rollout.group_size == 2 and params.train.mode == "full"
    assert params.rollout.height == 32  # the tiny preset still applies


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(_write(tmp_path, "train: [unclosed\n"))


def test_pipeline_loop_must_match_the_iteration_count(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.loop must map iterations 1..3 .*pipeline.iterations 3"):
        params_from_dict({"iterations": 3, "pipeline": {"loop": {"1": 0, "2": 1}}})


def test_evaluated_checkpoints_are_the_base_every_nth_and_the_last():
    from flash_grpo_core.config.dvc_layout import eval_points

    assert eval_points(5, 0) == (0, 5)
    assert eval_points(5, 2) == (0, 2, 4, 5)
    assert eval_points(4, 2) == (0, 2, 4)
    assert eval_points(1, 1) == (0, 1)
    loop = {"1": 0, "2": 1, "3": 2}
    with pytest.raises(ConfigError, match=r"pipeline.eval_at must be \[0, 3\] .*pipeline.iterations 3"):
        params_from_dict({"iterations": 3, "pipeline": {"loop": loop, "eval_at": [0, 1, 3]}})
    with pytest.raises(ConfigError, match="pipeline.eval_every must be >= 0"):
        params_from_dict({"pipeline": {"eval_every": -1}})
    assert params_from_dict({"iterations": 3, "pipeline": {"loop": loop, "eval_every": 2,
                                                           "eval_at": [0, 2, 3]}}).pipeline.eval_at == (0, 2, 3)


def test_setting_the_iteration_count_rewrites_both_and_keeps_comments(tmp_path):
    from flash_grpo_core.pipeline.iterations import set_iterations

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    set_iterations(path, 4)
    params = load_params(path)
    assert params.iterations == 4 and params.pipeline.loop == {"1": 0, "2": 1, "3": 2, "4": 3}
    assert params.pipeline.eval_at == (0, 1, 2, 3, 4)  # params.yaml's eval_every: 1
    text = path.read_text()
    assert "# Flash-GRPO parameters." in text and "loop: {'1': 0, '2': 1, '3': 2, '4': 3}" in text
    assert "eval_at: [0, 1, 2, 3, 4]" in text


@pytest.mark.parametrize("preset", ["tiny", "wan1_3b", "wan14b"])
def test_lora_defaults_are_the_authors_recipe_in_every_preset(preset):
    # scripts/train_wanx2_1_flash.py: r 16, alpha 32, init "gaussian", attention projections only
    model = load_params(ROOT / "params.yaml", preset=preset).model
    assert (model.lora_rank, model.lora_alpha, model.lora_init) == (16, 32, "gaussian")
    assert model.lora_compute == "input"  # the authors' bf16 runs multiply their adapters in bf16
    assert model.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert params_from_dict({}).model.lora_targets == model.lora_targets  # the dataclass default too


def test_lora_targets_and_init_are_validated_by_key(tmp_path):
    params = load_params(_write(tmp_path, "model:\n  lora_targets: [to_q, ffn.net.2]\n  lora_init: default\n"))
    assert params.model.lora_targets == ("to_q", "ffn.net.2") and params.model.lora_init == "default"
    with pytest.raises(ConfigError, match=r"model.lora_init must be one of \('gaussian', 'default'\), got 'kaiming'"):
        params_from_dict({"model": {"lora_init": "kaiming"}})
    with pytest.raises(ConfigError, match=r"model.lora_compute must be one of \('input', 'float32'\), got 'bf16'"):
        params_from_dict({"model": {"lora_compute": "bf16"}})
    with pytest.raises(ConfigError, match="model.lora_targets must list module-name suffixes"):
        params_from_dict({"model": {"lora_targets": []}})
    with pytest.raises(ConfigError, match="model.lora_targets must list module-name suffixes"):
        params_from_dict({"model": {"lora_targets": ["to_q", " "]}})
    with pytest.raises(ConfigError, match=r"model.lora_targets\[0\] must be a string"):
        params_from_dict({"model": {"lora_targets": [3]}})
    with pytest.raises(ConfigError, match="unknown key.*model.lora_target\\b"):
        params_from_dict({"model": {"lora_target": ["to_q"]}})


def test_default_params_select_the_learning_toy_preset_and_its_prompt_grid():
    """`dvc repro` with no edits: the toy task, its shipped base, its reward, its grid split by combination."""
    from flash_grpo_core.artifacts.prompt_sources import read_prompt_sources
    from flash_grpo_core.artifacts.prompts import curate
    from flash_grpo_core.tasks.toy import toy_prompts

    params = load_params(ROOT / "params.yaml")
    assert params.preset == "toy" and params.reward.weights == {"toy_following": 1.0}
    assert (ROOT / params.model.path / "transformer.safetensors").is_file()  # the shipped base, no pre-training
    assert params.data.source == "prompts/toy.jsonl" and params.data.semantic_threshold is None
    train, held_out = toy_prompts(params.toy)
    raw = read_prompt_sources([ROOT / params.data.source])
    assert sorted(r.text for r in raw if r.split == "eval") == sorted(held_out)  # the file agrees with toy.held_out
    assert sorted(r.text for r in raw if r.split == "train") == sorted(train)
    curated = curate(raw, params.data)
    assert sorted(p.prompt for p in curated.eval) == sorted(held_out) and len(curated.train) == len(train)
    assert params.eval.num_prompts == len(held_out) and params.eval.samples_per_prompt > 1


def test_unknown_rewards_and_non_finite_weights_are_refused_before_any_stage():
    from flash_grpo_core.rewards import check_reward_params

    with pytest.raises(ConfigError, match=r"reward.weights names unknown reward\(s\) \['hps_v3'\]; known: .*toy_following"):
        check_reward_params(params_from_dict({"reward": {"weights": {"hps_v3": 1.0}}}).reward)
    for weight in (float("nan"), float("inf"), "high"):
        with pytest.raises(ConfigError, match="reward.weights.brightness must be a (finite )?number"):
            params_from_dict({"reward": {"weights": {"brightness": weight}}})


@pytest.mark.parametrize("key, value", [("pipeline.root", "runs;touch${IFS}owned;echo"), ("pipeline.root", "my runs"),
                                        ("pipeline.root", "../elsewhere"), ("data.source", "prompts/a b.txt"),
                                        ("data.source", "$(id).txt"), ("pipeline.root", "-rf")])
def test_paths_that_reach_dvc_yaml_commands_are_plain(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key} must be a relative path of letters"):
        params_from_dict({section: {name: value}})


def test_cuda_without_a_cuda_device_is_a_config_error(monkeypatch):
    import torch

    from flash_grpo_core.engine.iteration import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.device is 'cuda' but this machine has no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("count", ["0", "-3"])
def test_the_single_process_runner_refuses_no_iterations(count, capsys):
    from flash_grpo_core.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--iterations", count])
    assert exited.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["wan1_3b", "wan14b"])
def test_wan_presets_run_the_authors_epoch(preset):
    # config/dgx.py wan2_1_flash: 96 processes x 1 prompt x 2 videos a sampling batch, 4 ranks a prompt
    # (a group of 8), 2 batches an epoch: 48 prompts x 8 = 384 videos; minibatches = optimizer steps
    params = load_params(ROOT / "params.yaml", preset=preset)
    videos = params.rollout.prompts_per_iteration * params.rollout.group_size
    assert (params.rollout.prompts_per_iteration, params.rollout.group_size) == (48, 8)
    assert videos == 384 and params.train.minibatches == 2 and videos // params.train.minibatches == 192


def test_flowgrpo_preset_is_flow_grpos_wan_recipe():
    params = load_params(ROOT / "params.yaml", preset="wan1_3b_flowgrpo")
    model, rollout, train = params.model, params.rollout, params.train
    assert (model.lora_rank, model.lora_alpha) == (32, 64)
    assert (train.mode, train.rectify, train.timestep_fraction, train.kl_beta, train.std_scope) == (
        "full", "none", 0.99, 0.004, "group")
    assert (rollout.height, rollout.width, rollout.frames) == (240, 416, 33)
    assert model.path == load_params(ROOT / "params.yaml", preset="wan1_3b").model.path  # the same base model
    assert rollout.prompts_per_iteration * rollout.group_size == 384 and train.minibatches == 2
    assert all("." not in name for name in read_yaml(ROOT / "params.yaml")["presets"])  # DVC param paths


@pytest.mark.parametrize("mode, rectify", [("flash", "exact"), ("full", "none"), ("window", "none"),
                                           ("window_k", "none")])
def test_rectify_auto_resolves_per_mode_and_an_explicit_setting_wins(mode, rectify):
    assert params_from_dict({"train": {"mode": mode}}).train.rectify == rectify
    assert params_from_dict({"train": {"mode": mode, "rectify": "auto"}}).train.rectify == rectify
    assert params_from_dict({"train": {"mode": mode, "rectify": "exact"}}).train.rectify == "exact"
    assert params_from_dict({"train": {"mode": mode, "rectify": "flow_grpo"}}).train.rectify == "flow_grpo"


def test_repository_params_resolve_rectify_as_before_for_the_cpu_presets():
    # the toy and tiny presets train flash: base `auto` gives the exact rectification they always ran
    assert read_yaml(ROOT / "params.yaml")["train"]["rectify"] == "auto"
    for preset in ("toy", "tiny", "wan1_3b", "wan14b"):
        assert load_params(ROOT / "params.yaml", preset=preset).train.rectify == "exact"
    full = load_params(ROOT / "params.yaml", preset="tiny", overrides={"train.mode": "full"})
    assert full.train.rectify == "none"
    with pytest.raises(ConfigError, match="train.rectify must be one of"):
        params_from_dict({"train": {"rectify": "sometimes"}})


@pytest.mark.parametrize("preset", ["wan1_3b", "wan1_3b_flowgrpo", "wan14b"])
def test_every_wan_preset_is_a_real_weights_run(preset):
    # what the stages, the flow and the preflight expect of a preset that loads Wan 2.1 weights
    from flash_grpo_core.pipeline.plan import known_arch

    params = load_params(ROOT / "params.yaml", preset=preset)
    assert params.model.path.startswith("models/") and params.model.gradient_checkpointing
    assert set(params.reward.weights) == {"hpsv3"} and params.reward.options["hpsv3"]["base_path"]
    assert known_arch(preset) in ("wan1_3b", "wan14b") and not params.is_tiny
    with pytest.raises(ConfigError, match=f"preset {preset} loads Wan 2.1 weights"):
        load_params(ROOT / "params.yaml", preset=preset, overrides={"model.path": None})
