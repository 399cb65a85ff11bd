"""The corpus of bench/faults/repro.py: bad edits of a finished tiny-preset workspace, each followed
by `dvc repro`, with what each one is expected to give (see that module for the expectations).

`params` cases set dotted keys in the workspace's params.yaml (the tiny preset selected, 2
iterations); `edit` cases change the project's files: the params file's text, the prompt file
(`data.source`), the toy preset's shipped base model (bench/toy/base), or a finished output.
`SMALL` is the test suite's subset: cases that reach a stage up to `update@1`, most of them cheap
(a refusal before any compute).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.faults.repro import DELETE, ReproCase

INF, NAN = math.inf, math.nan
SOURCE = "prompts/toy.jsonl"  # the workspace's data.source
TOY_BASE = "bench/toy/base"
IT0, IT1 = "runs/tiny/it0", "runs/tiny/it1"


def refused(name: str, params: dict, names: str, category: str = "params") -> ReproCase:
    return ReproCase(name, category, "refused", names, params=params)


def write(relative: str, content: bytes | str):
    """An edit: the project file `relative` now holds `content`."""
    def edit(project: Path) -> None:
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return edit


def truncate(relative: str, size: int):
    def edit(project: Path) -> None:
        with open(project / relative, "r+b") as handle:
            handle.truncate(size)
    return edit


def remove(relative: str):
    def edit(project: Path) -> None:
        (project / relative).unlink()
    return edit


def params_text(change):
    """An edit of params.yaml's text: `change(text) -> new text`."""
    def edit(project: Path) -> None:
        path = project / "params.yaml"
        path.write_text(change(path.read_text()))
    return edit


def with_params(params: dict, edit):
    """An edit plus params overrides (applied after the edit)."""
    def both(project: Path) -> None:
        from bench.faults.repro import set_params

        edit(project)
        set_params(project / "params.yaml", params)
    return both


def source_case(name: str, content: bytes | str, file: str = "prompts/bad.jsonl") -> ReproCase:
    """A prompt file of this content as data.source."""
    return ReproCase(name, "prompts", "refused", file, edit=with_params({"data.source": file}, write(file, content)))


def toy_model_case(name: str, edit, names: str) -> ReproCase:
    """The toy preset (it reads model.path: the shipped base) with its base folder damaged."""
    return ReproCase(name, "model", "refused", names, edit=with_params({"preset": "toy"}, edit))


UNKNOWN_KEYS = [
    refused("unknown top-level key", {"colour": "red"}, "colour"),
    refused("unknown key in model", {"model.lora_rnk": 8}, "model.lora_rnk"),
    refused("unknown key in rollout", {"rollout.num_step": 10}, "rollout.num_step"),
    refused("unknown key in train", {"train.learnin_rate": 1e-4}, "train.learnin_rate"),
    refused("unknown key in reward", {"reward.weight": {"brightness": 1.0}}, "reward.weight"),
    refused("unknown key in data", {"data.sorce": SOURCE}, "data.sorce"),
    refused("unknown key in pipeline", {"pipeline.rot": "runs"}, "pipeline.rot"),
    refused("unknown key in toy", {"toy.sise": 16}, "toy.sise"),
    refused("unknown key in eval", {"eval.num_prompt": 2}, "eval.num_prompt"),
    refused("unknown key in export", {"export.use_emma": True}, "export.use_emma"),
    refused("unknown key in the preset's train", {"presets.tiny.train.minibatch": 2}, "train.minibatch"),
    refused("unknown section in the preset", {"presets.tiny.colour": {"red": 1}}, "colour"),
    refused("key of the preset deleted from the base", {"train.learning_rate": DELETE}, "train.learning_rate"),
]
WRONG_TYPES = [
    refused("seed a string", {"seed": "zero"}, "seed"),
    refused("iterations a string", {"iterations": "two"}, "iterations"),
    refused("learning rate a string", {"train.learning_rate": "fast"}, "train.learning_rate"),
    refused("num_steps a quoted number", {"rollout.num_steps": "20"}, "rollout.num_steps"),
    refused("shift a string", {"rollout.shift": "three"}, "rollout.shift"),
    refused("guidance a string", {"rollout.guidance": "high"}, "rollout.guidance"),
    refused("preset height a quoted number", {"presets.tiny.rollout.height": "32"}, "rollout.height"),
    refused("min_words a string", {"data.min_words": "two"}, "data.min_words"),
    refused("negative prompt a number", {"rollout.negative_prompt": 5}, "rollout.negative_prompt"),
    refused("seed a bool", {"seed": True}, "seed"),
    refused("num_steps a bool", {"rollout.num_steps": True}, "rollout.num_steps"),
    refused("minibatches a bool", {"presets.tiny.train.minibatches": True}, "train.minibatches"),
    refused("iso_temporal a string", {"rollout.iso_temporal": "yes"}, "rollout.iso_temporal"),
    refused("skip_zero_advantage an integer", {"train.skip_zero_advantage": 1}, "train.skip_zero_advantage"),
    refused("use_ema a string", {"eval.use_ema": "false"}, "eval.use_ema"),
    refused("betas of one value", {"train.betas": [0.9]}, "train.betas"),
    refused("betas of three values", {"train.betas": [0.9, 0.99, 0.999]}, "train.betas"),
    refused("LoRA targets empty", {"model.lora_targets": []}, "model.lora_targets"),
    refused("LoRA targets a string", {"model.lora_targets": "to_q"}, "model.lora_targets"),
    refused("toy colours empty", {"toy.colors": []}, "toy.colors"),
    refused("reward weights a list", {"reward.weights": ["brightness"]}, "reward.weights"),
]
BAD_NUMBERS = [
    refused("negative seed", {"seed": -1}, "seed"),
    refused("negative data seed", {"data.seed": -1}, "data.seed"),
    refused("negative eval seed", {"eval.seed": -5}, "eval.seed"),
    refused("negative prompts per iteration", {"presets.tiny.rollout.prompts_per_iteration": -2},
            "rollout.prompts_per_iteration"),
    refused("batch size 0", {"rollout.batch_size": 0}, "rollout.batch_size"),
    refused("minibatches 0", {"presets.tiny.train.minibatches": 0}, "train.minibatches"),
    refused("negative micro batch", {"presets.tiny.train.micro_batch": -1}, "train.micro_batch"),
    refused("num_steps 0", {"rollout.num_steps": 0}, "rollout.num_steps"),
    refused("num_candidates 0", {"rollout.num_candidates": 0}, "rollout.num_candidates"),
    refused("negative iterations", {"iterations": -1}, "iterations"),
    refused("groups per shard 0", {"pipeline.groups_per_shard": 0}, "pipeline.groups_per_shard"),
    refused("negative optimizer states kept", {"train.keep_optimizer_states": -1}, "train.keep_optimizer_states"),
    refused("negative keep_checkpoints_every", {"pipeline.keep_checkpoints_every": -1},
            "pipeline.keep_checkpoints_every"),
    refused("negative text_len", {"presets.tiny.model.text_len": -1}, "model.text_len"),
    refused("ema_every 0", {"presets.tiny.train.ema_every": 0}, "train.ema_every"),
    refused("max_words below min_words", {"data.max_words": 1}, "data.max_words"),
    refused("learning rate 0", {"train.learning_rate": 0.0}, "train.learning_rate"),
    refused("negative learning rate", {"train.learning_rate": -1e-4}, "train.learning_rate"),
    refused("infinite learning rate", {"train.learning_rate": INF}, "train.learning_rate"),
    refused("NaN learning rate", {"train.learning_rate": NAN}, "train.learning_rate"),
    refused("preset learning rate 0", {"presets.tiny.train.learning_rate": 0.0}, "train.learning_rate"),
    refused("clip range 0", {"train.clip_range": 0.0}, "train.clip_range"),
    refused("negative grad clip", {"train.grad_clip": -1.0}, "train.grad_clip"),
    refused("negative weight decay", {"train.weight_decay": -0.1}, "train.weight_decay"),
    refused("adv_clip 0", {"train.adv_clip": 0.0}, "train.adv_clip"),
    refused("negative KL beta", {"train.kl_beta": -0.1}, "train.kl_beta"),
    refused("NaN KL beta", {"train.kl_beta": NAN}, "train.kl_beta"),
    refused("infinite shift", {"rollout.shift": INF}, "rollout.shift"),
    refused("guidance below 1", {"rollout.guidance": 0.5}, "rollout.guidance"),
    refused("negative noise level", {"rollout.noise_level": -1.0}, "rollout.noise_level"),
    refused("timestep fraction 0", {"train.timestep_fraction": 0.0}, "train.timestep_fraction"),
    refused("LoRA alpha 0", {"model.lora_alpha": 0}, "model.lora_alpha"),
    refused("checkpoint_every 0", {"model.checkpoint_every": 0}, "model.checkpoint_every"),
    refused("head steps above k", {"rollout.head_steps": 50}, "rollout.head_steps"),
    refused("negative tail steps", {"rollout.tail_steps": -1}, "rollout.tail_steps"),
    refused("negative guidance_until", {"rollout.guidance_until": -0.5}, "rollout.guidance_until"),
    refused("eval fraction above 1", {"data.eval_fraction": 1.5}, "data.eval_fraction"),
    refused("semantic threshold above 1", {"data.semantic_threshold": 2.0}, "data.semantic_threshold"),
    refused("frame stride 0", {"reward.frame_stride": 0}, "reward.frame_stride"),
]
SHAPES = [
    refused("group_size 1", {"presets.tiny.rollout.group_size": 1}, "group_size"),
    refused("group_size 0", {"presets.tiny.rollout.group_size": 0}, "group_size"),
    refused("K above N", {"rollout.num_candidates": 30}, "rollout.num_candidates"),
    refused("frames not 4k+1", {"presets.tiny.rollout.frames": 10}, "rollout.frames"),
    refused("frames 0", {"presets.tiny.rollout.frames": 0}, "rollout.frames"),
    refused("height not a multiple of 16", {"presets.tiny.rollout.height": 40}, "rollout.height"),
    refused("width not a multiple of 16", {"presets.tiny.rollout.width": 24}, "rollout.width"),
    refused("negative height", {"presets.tiny.rollout.height": -16}, "rollout.height"),
    refused("minibatches that do not divide the batch", {"presets.tiny.train.minibatches": 3}, "train.minibatches"),
    refused("window larger than N - 1", {"train.mode": "window", "train.window_size": 25}, "train.window_size"),
    refused("window size 0", {"train.mode": "window", "train.window_size": 0}, "train.window_size"),
    refused("eval prompts above the eval set", {"presets.tiny.eval.num_prompts": 50}, "eval.num_prompts"),
    refused("eval prompts 0", {"presets.tiny.eval.num_prompts": 0}, "eval.num_prompts"),
]
NAMES = [
    refused("misspelt reward name", {"reward.weights": {"brightnes": 1.0}}, "brightnes"),
    refused("options of an unknown reward", {"reward.options": {"brightnes": {}}}, "brightnes"),
    refused("unknown option of a reward", {"reward.options": {"brightness": {"bogus": 1}}}, "bogus"),
    refused("misspelt preset", {"preset": "tinny"}, "preset"),
    refused("preset in capitals", {"preset": "Tiny"}, "preset"),
    refused("unknown train mode", {"train.mode": "flash_grpo"}, "train.mode"),
    refused("unknown std scope", {"train.std_scope": "global"}, "train.std_scope"),
    refused("unknown schedule", {"rollout.schedule": "karras"}, "rollout.schedule"),
    refused("unknown noise kind", {"rollout.noise": "sde"}, "rollout.noise"),
    refused("unknown finetune", {"model.finetune": "qlora"}, "model.finetune"),
    refused("unknown dtype", {"model.dtype": "fp8"}, "model.dtype"),
    refused("unknown device", {"model.device": "tpu"}, "model.device"),
    refused("unknown LoRA init", {"model.lora_init": "xavier"}, "model.lora_init"),
    refused("unknown LoRA compute", {"model.lora_compute": "fp16"}, "model.lora_compute"),
    refused("unknown parallel strategy", {"train.parallel": "zero3"}, "train.parallel"),
    refused("unknown optimizer state place", {"train.optimizer_state": "disk"}, "train.optimizer_state"),
    refused("misspelt rectify", {"train.rectify": "exactly"}, "train.rectify"),
    refused("rectify the string None", {"train.rectify": "None"}, "train.rectify"),
    refused("rectify null", {"train.rectify": None}, "train.rectify"),
]
LAYOUT = [
    refused("iterations out of step with pipeline.loop", {"iterations": 3}, "pipeline.loop"),
    refused("iterations 1 with a loop of 2", {"iterations": 1}, "pipeline.loop"),
    refused("pipeline.loop with a wrong predecessor", {"pipeline.loop": {"1": 0, "2": 0}}, "pipeline.loop"),
    refused("eval_at without the last iteration", {"pipeline.eval_at": [0, 1]}, "pipeline.eval_at"),
    refused("eval_at beyond the iterations", {"pipeline.eval_at": [0, 1, 2, 5]}, "pipeline.eval_at"),
    refused("eval_every out of step with eval_at", {"pipeline.eval_every": 2}, "pipeline.eval_at"),
    refused("negative eval_every", {"pipeline.eval_every": -1}, "pipeline.eval_every"),
    refused("pipeline.root with a space", {"pipeline.root": "my runs"}, "pipeline.root"),
    refused("pipeline.root absolute", {"pipeline.root": "/srv/runs"}, "pipeline.root"),
    refused("pipeline.root outside the project", {"pipeline.root": "runs/../.."}, "pipeline.root"),
    refused("pipeline.root with shell characters", {"pipeline.root": "runs;rm"}, "pipeline.root"),
]
PARAMS_FILE = [
    ReproCase("params: unclosed bracket", "params file", "dvc", "params.yaml",
              edit=params_text(lambda text: text.replace("betas: [0.9, 0.999]", "betas: [0.9, 0.999"))),
    ReproCase("params: tab indentation", "params file", "dvc", "params.yaml",
              edit=params_text(lambda text: text.replace("\n  path: null", "\n\tpath: null"))),
    ReproCase("params: duplicate key", "params file", "dvc", "params.yaml",
              edit=params_text(lambda text: text.replace("\nseed: 0\n", "\nseed: 0\nseed: 1\n"))),
    ReproCase("params: a stray line", "params file", "dvc", "params.yaml",
              edit=params_text(lambda text: text.replace("\nseed: 0\n", "\nseed: 0\n  oops: [\n"))),
    ReproCase("params: not UTF-8", "params file", "dvc", "params.yaml", edit=write("params.yaml", b"seed: \xff\xfe\n")),
    ReproCase("params: empty file", "params file", "dvc", "pipeline.loop", edit=write("params.yaml", "")),
    ReproCase("params: only comments", "params file", "dvc", "pipeline.loop", edit=write("params.yaml", "# none\n")),
    ReproCase("params: a YAML list", "params file", "dvc", "params.yaml", edit=write("params.yaml", "- 1\n- 2\n")),
]
SHADOWED = [  # legal, but the edit has no effect: expected a warning naming the key, and nothing lost
    ReproCase("base micro_batch shadowed by the preset", "shadowed", "warned", "train.micro_batch",
              params={"train.micro_batch": 8}),
    ReproCase("base group_size shadowed by the preset", "shadowed", "warned", "rollout.group_size",
              params={"rollout.group_size": 6}),
    ReproCase("base eval num_steps shadowed by the preset", "shadowed", "warned", "eval.num_steps",
              params={"eval.num_steps": 30}),
]
PROMPTS = [
    # DVC itself refuses: validate depends on the base data.source, so DVC stops at the missing dependency
    ReproCase("data.source missing", "prompts", "dvc", "prompts/no-such.jsonl",
              params={"data.source": "prompts/no-such.jsonl"}),
    ReproCase("data.source a folder", "prompts", "refused", "prompts",
              params={"data.source": "prompts"}),
    source_case("prompt file of garbage", b"\x00\x01garbage\x02{[\n"),
    source_case("prompt file empty", b""),
    source_case("prompt file of blank lines", b"\n\n   \n"),
    source_case("prompt file a csv", "prompt\na red square moving left\n", "prompts/bad.csv"),
    source_case("prompts all too short", '{"prompt": "red"}\n{"prompt": "blue"}\n'),
    ReproCase("prompt file edited to garbage", "prompts", "refused", SOURCE, edit=write(SOURCE, b"not json at all\n")),
    ReproCase("prompt file emptied", "prompts", "refused", SOURCE, edit=write(SOURCE, b"")),
    ReproCase("prompt file truncated mid-line", "prompts", "refused", SOURCE, edit=truncate(SOURCE, 100)),
]
MODELS = [
    toy_model_case("toy base: garbage safetensors", write(f"{TOY_BASE}/transformer.safetensors", b"garbage" * 50),
                   "transformer.safetensors"),
    toy_model_case("toy base: truncated safetensors", truncate(f"{TOY_BASE}/transformer.safetensors", 4096),
                   "transformer.safetensors"),
    # (the base's pretrain.json is the pre-training's record for people: no stage reads it, so a
    # damaged one is no bad input)
    ReproCase("toy preset, model.path missing", "model", "refused", "models/no-such-toy",
              params={"preset": "toy", "presets.toy.model.path": "models/no-such-toy"}),
    ReproCase("wan preset, model.path missing", "model", "refused", "models/no-such-wan",
              params={"preset": "wan1_3b", "presets.wan1_3b.model.path": "models/no-such-wan",
                      "data.source": "prompts/example.txt"}),  # real prompts: the toy grid is refused first
]
OUTPUTS = [  # damaged finished outputs: DVC's hash sees them and reruns the stage that wrote them
    ReproCase("checkpoint safetensors truncated", "outputs", "repaired", "'init'",
              edit=truncate(f"{IT0}/checkpoint/trainable.safetensors", 100)),
    ReproCase("non-finite value in reward_state.json", "outputs", "repaired", "'init'",
              edit=write(f"{IT0}/reward_state.json", json.dumps({"brightness": {"mean": NAN}}))),
    ReproCase("infinite value in an iteration's reward_state.json", "outputs", "repaired", "'score@1'",
              edit=write(f"{IT1}/reward_state.json", '{"brightness": {"mean": Infinity}}')),
    ReproCase("cache: false metric deleted", "outputs", "repaired", "'score@1'", edit=remove(f"{IT1}/score.json")),
    ReproCase("curate report garbage", "outputs", "repaired", "'curate'", edit=write("runs/prompts/report.json", "{")),
]
FULL = [*UNKNOWN_KEYS, *WRONG_TYPES, *BAD_NUMBERS, *SHAPES, *NAMES, *LAYOUT, *PARAMS_FILE, *SHADOWED, *PROMPTS,
        *MODELS, *OUTPUTS]
SMALL = [case for case in FULL if case.name in (  # one of each expectation; test_pipeline has more bad edits
    "params: unclosed bracket", "base micro_batch shadowed by the preset", "prompt file edited to garbage",
    "checkpoint safetensors truncated")]
