"""The run this project exists for, rehearsed on a CPU: `preset: wan1_3b` end to end on 2 processes.

What a real run reads is built here in its released layout, tiny and random (tests/fakes.py): a
Diffusers-format Wan 2.1 T2V folder saved by the project's own `save_stack`, an HPSv3.safetensors
on a Qwen2-VL-Instruct base folder, and a prompt folder of train.txt / test.txt. A scratch copy of
the project selects wan1_3b with one iteration (`copy_project`, as
`python -m flash_grpo_core.pipeline.iterations 1`), then `dvc exp run -S` overrides only paths and
sizes (`_weights`, DATA_SOURCE, SIZES) and runs the whole pipeline,
curate to export, every multi-rank stage on 2 processes. The recipe (learning rate, LoRA rank and
targets, guidance, sampling steps, HPSv3's JPEG round trip and top-30% frames, ...) stays the
preset's: the first test checks that nothing else moved.

One DVC run for the module (about 2 CPU-minutes: 9 stages, each a few Python processes that import
torch and diffusers; the one-process stages start warm, tests/warm_runner.py); the tests read its
outputs.
"""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from fakes import make_hpsv3_checkpoint, save_qwen2vl_base, save_wan_folder, write_prompt_folder
from flash_grpo_core.config import load_params, read_yaml
from flash_grpo_core.pipeline.workspace import copy_project, tool_env
from flows.params_file import _defines
from warm_runner import warm_runner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = Path("runs/wan1_3b")
pytestmark = pytest.mark.slow

TRAIN_PROMPTS = [f"a {colour} {animal} {action} in {place}" for colour, animal in
                 (("red", "fox"), ("white", "horse"), ("black", "cat"), ("brown", "bear"))
                 for action, place in (("running", "a snowy forest"), ("resting", "tall grass"),
                                       ("drinking", "a mountain stream"), ("walking", "an empty city street"))]
TEST_PROMPTS = ["waves crashing on a rocky beach at sunset", "a paper boat drifting down a rainy gutter"]
PROMPT_FOLDER = "prompts/rehearsal"  # train.txt and test.txt, the authors' dataset/video layout
DATA_SOURCE = PROMPT_FOLDER

# Sizes for 2 CPU ranks. The authors' batch arithmetic in shape: several groups (4 prompts x 4, two
# groups sampled on each rank), two optimizer steps an iteration (minibatches 2), each of several
# micro-batches of 1 on every rank (accumulated under DDP's no_sync). The counts are set even where
# the preset has them, so the test does not depend on its numbers. The EMA's cadence is scaled with
# the run: at the preset's every 8 steps, a 2-step run would evaluate and export the untouched base.
SIZES = {"rollout.height": 32, "rollout.width": 32, "rollout.frames": 9, "rollout.prompts_per_iteration": 4,
         "rollout.group_size": 4, "rollout.batch_size": 2, "train.minibatches": 2, "train.micro_batch": 1,
         "train.ema_every": 1, "eval.num_prompts": 2, "eval.num_steps": 8}
# what copy_project sets for one iteration
LAYOUT = ("iterations", "pipeline.loop", "pipeline.eval_at")
STAGES = ("curate", "init", "rollout@1", "score@1", "update@1", "eval_checkpoint@0", "eval_checkpoint@1", "evaluate",
          "export")


def _run(args, cwd, timeout=900):
    env = tool_env(OMP_NUM_THREADS="1", FLASH_GRPO_NPROC_PER_NODE="2", FLASH_GRPO_DIST_TIMEOUT="120")
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    command = " ".join(map(str, args))
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def _weights(folder: Path) -> dict[str, str]:
    """The released files, tiny and random, outside the workspace as a user's downloads are."""
    wan = save_wan_folder(folder / "Wan2.1-T2V-1.3B-Diffusers")
    qwen = save_qwen2vl_base(folder / "Qwen2-VL-7B-Instruct")
    make_hpsv3_checkpoint(qwen, folder / "HPSv3" / "HPSv3.safetensors")
    return {"model.path": str(wan), "reward.options.hpsv3.path": str(folder / "HPSv3" / "HPSv3.safetensors"),
            "reward.options.hpsv3.base_path": str(qwen)}


def _set_params(project: Path, overrides: dict) -> list[str]:
    """`-S key=value` for each override, at the place it takes effect: under presets.wan1_3b where the
    preset sets the key (a base value would be shadowed), in the base section otherwise."""
    preset = read_yaml(project / "params.yaml")["presets"]["wan1_3b"]
    args = []
    for key, value in overrides.items():
        scoped = f"presets.wan1_3b.{key}" if _defines(preset, key.split(".")) else key
        args += ["-S", f"{scoped}={value}"]
    return args


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, dvc_cache):
    project = copy_project(ROOT, tmp_path_factory.mktemp("rehearsal"), preset="wan1_3b", iterations=1,
                           cache_dir=dvc_cache)
    write_prompt_folder(project / PROMPT_FOLDER, TRAIN_PROMPTS, TEST_PROMPTS)
    for command in (["config", "user.email", "pipeline@localhost"], ["config", "user.name", "pipeline"],
                    ["add", "-A"], ["commit", "-qm", "prompts"]):
        subprocess.run(["git", *command], cwd=project, check=True, capture_output=True)
    overrides = {**_weights(tmp_path_factory.mktemp("weights")), "data.source": DATA_SOURCE, **SIZES}
    # the one-process stages (validate, curate, init, evaluate, export) start warm; ranks under torchrun never do
    with warm_runner(project, min_served=5, OMP_NUM_THREADS="1"):
        done = _run([BIN / "dvc", "exp", "run", *_set_params(project, overrides)], project)
    return project, overrides, done.stdout


def _flat(params) -> dict:
    """Every parameter's value by its dotted key (mappings down to their leaves)."""

    def walk(value, prefix):
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in walk(item, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    return walk(dataclasses.asdict(params), "")


def test_repro_runs_every_stage_on_two_processes_and_leaves_dvc_clean(rehearsal):
    project, overrides, stdout = rehearsal
    for stage in STAGES:
        assert f"Running stage '{stage}'" in stdout, stage
    ranks = re.findall(r"^(\w+): iteration=.* processes=(\d+)", stdout, re.MULTILINE)
    assert {name for name, count in ranks if count == "2"} >= {"rollout", "score", "update", "eval_checkpoint"}
    status = _run([BIN / "dvc", "status", "--json"], project)
    assert json.loads(status.stdout) == {}, status.stdout
    # only paths and sizes moved: every other effective parameter is the repository's wan1_3b preset
    ours = _flat(load_params(project / "params.yaml"))
    preset = _flat(load_params(ROOT / "params.yaml", preset="wan1_3b"))
    changed = {key for key in {*ours, *preset} if ours.get(key, "absent") != preset.get(key, "absent")}
    unexpected = {key for key in changed if not any(key == k or key.startswith(f"{k}.") for k in (*overrides, *LAYOUT))}
    assert not unexpected, unexpected
    assert {"model.path", "data.source", "rollout.height"} <= changed
    assert (ours["model.lora_targets"], ours["rollout.guidance"]) == (("to_q", "to_k", "to_v", "to_out.0"), 4.5)


def test_the_curated_splits_are_the_prompt_folders_files(rehearsal):
    project = rehearsal[0]
    splits = {name: set(pq.read_table(project / "runs/prompts" / f"{name}.parquet").column("prompt").to_pylist())
              for name in ("train", "eval")}
    assert splits == {"train": set(TRAIN_PROMPTS), "eval": set(TEST_PROMPTS)}


def test_the_reward_is_hpsv3_with_the_authors_frame_settings(rehearsal):
    """The scores are HPSv3's on the rollout's videos, with the preset's options as they stand (JPEG
    round trip, mean of the top 30% of frames: HPSv3Reward's defaults)."""
    from flash_grpo_core.artifacts.shards import read_shards, read_videos
    from flash_grpo_core.rewards import build_reward

    project = rehearsal[0]
    table = pq.read_table(project / RUN / "it1" / "scores.parquet").to_pydict()
    assert [name for name in table if name.startswith("component/")] == ["component/hpsv3"]
    assert table["reward"] == table["component/hpsv3"] and len(set(table["reward"])) > 1
    summary = json.loads((project / RUN / "it1" / "score.json").read_text())
    assert summary["reward_mean"] == pytest.approx(sum(table["reward"]) / len(table["reward"]))
    options = load_params(project / "params.yaml").reward.options["hpsv3"]
    records = read_shards(project / RUN / "it1" / "rollout", [0])
    videos = read_videos(project / RUN / "it1" / "rollout", [r.key for r in records], [0])  # [G, F, H, W, 3]
    prompts = [record.prompt for record in records]
    reward = build_reward("hpsv3", **options)
    assert (reward.jpeg, reward.aggregate, reward.top_fraction) == (True, "top_mean", 0.3)
    expected = dict(zip(table["key"], table["component/hpsv3"]))
    torch.testing.assert_close(reward(videos, prompts).scores, torch.tensor([expected[r.key] for r in records]),
                               rtol=1e-5, atol=1e-6)
    without_jpeg = build_reward("hpsv3", **options, jpeg=False)(videos, prompts).scores
    assert not torch.allclose(without_jpeg, torch.tensor([expected[r.key] for r in records]), rtol=1e-5, atol=1e-6)
    evaluation = json.loads((project / RUN / "eval" / "points" / "it1" / "metrics.json").read_text())["metrics"]
    assert evaluation["reward"] == evaluation["reward/hpsv3"]


def test_the_exported_lora_adapts_attention_only(rehearsal):
    project = rehearsal[0]
    path = project / RUN / "export" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as exported:
        keys = set(exported.keys())
        metadata = json.loads(exported.metadata()["lora_adapter_metadata"])
    pattern = re.compile(r"transformer\.blocks\.(\d+)\.attn([12])\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight")
    assert all(pattern.fullmatch(key) for key in keys), sorted(key for key in keys if not pattern.fullmatch(key))
    # every projection of self- and cross-attention in both blocks of the tiny transformer, A and B
    assert len(keys) == 2 * 2 * 4 * 2
    assert sorted(metadata["transformer.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (16, 32)


def test_the_export_loads_into_wan_pipeline_from_the_saved_folder(rehearsal):
    """`WanPipeline.from_pretrained(model.path).load_lora_weights(export)`, as a user runs it: the
    transformer's velocity moves off the base and equals the engine's with the checkpoint's EMA."""
    from diffusers import WanPipeline

    from stages.runtime import common
    from test_export import velocity

    project, overrides, _ = rehearsal
    pipe = WanPipeline.from_pretrained(overrides["model.path"], local_files_only=True)
    base = velocity(pipe.transformer)
    pipe.load_lora_weights(str(project / RUN / "export"))
    adapted = velocity(pipe.transformer)
    params = load_params(project / "params.yaml")
    engine, _ = common.engine_at(params, str(project / RUN / "it1" / "checkpoint"), text_encoder=False)
    with engine.policy.ema.applied():
        ours = velocity(engine.policy.transformer)
    torch.testing.assert_close(adapted, ours, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(base, ours, rtol=1e-4, atol=1e-6)  # the base model fails the same comparison
