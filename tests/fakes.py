"""Tiny random stand-ins for what a real run reads, saved in the layouts the real files are released in.

- a Wan 2.1 T2V Diffusers folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
  scheduler/) holding the tiny random stack, written by the project's own `save_stack`;
- a Qwen2-VL-Instruct base folder (2 layers, a 1-block vision tower, a byte-level BPE tokenizer
  trained here on the reward prompts) and an HPSv3.safetensors built from it;
- a prompt folder in the authors' and Flow-GRPO's layout: train.txt and test.txt, one prompt a line.

Nothing is downloaded. Shared by the reward-model tests and the wan1_3b rehearsal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
TINY_PIXELS = 56 * 56  # 2 x 2 merged vision tokens per frame
QWEN_HIDDEN = 32  # the tiny Qwen2-VL's text width: the HPSv3 head's input


def save_wan_folder(path: Path, seed: int = 0) -> Path:
    """The tiny random Wan stack as a Diffusers-format Wan 2.1 T2V folder at `path` (what users download)."""
    from flash_grpo_core.models.random_stacks import build_tiny_stack
    from flash_grpo_core.models.wan import save_stack

    save_stack(build_tiny_stack(seed=seed), path)
    return path


def byte_level_bpe(vocab_size: int = 2000) -> dict:
    """{vocab, merges} of a byte-level BPE trained here on the reward prompts, so that they are a
    few hundred tokens (the real Qwen2 tokenizer is a byte-level BPE of 151k tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from flash_grpo_core.rewards.prompts import HPSV3_PROMPT, VIDEOALIGN_PROMPT

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([HPSV3_PROMPT, VIDEOALIGN_PROMPT], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return {"vocab": model["vocab"], "merges": [tuple(merge) for merge in model["merges"]]}


def save_qwen2vl_base(folder: Path) -> Path:
    """A tiny Qwen2-VL-Instruct stand-in at `folder`: config, byte-level BPE tokenizer, weights
    (save_pretrained: the released checkpoints' legacy key layout)."""
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = Qwen2Tokenizer(**byte_level_bpe())
    tokenizer.add_tokens(QWEN_SPECIALS[1:], special_tokens=True)
    ids = dict(zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(QWEN_SPECIALS)))
    text = {"vocab_size": len(tokenizer), "hidden_size": QWEN_HIDDEN, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.5,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": QWEN_HIDDEN, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "initializer_range": 0.5}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_hpsv3_checkpoint(base: Path, path: Path) -> dict[str, torch.Tensor]:
    """HPSv3.safetensors as released: every backbone weight (legacy names), the embeddings grown
    by one row for <|Reward|>, and the "ranknet" head rm_head.{0,3,5} with 2 outputs (mu, sigma)."""
    from safetensors.torch import load_file, save_file

    state = dict(load_file(base / "model.safetensors"))
    generator = torch.Generator().manual_seed(7)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], 0.02 * torch.randn(1, QWEN_HIDDEN, generator=generator)])
    for index, (n_in, n_out) in zip((0, 3, 5), ((QWEN_HIDDEN, 8), (8, 4), (4, 2))):
        state[f"rm_head.{index}.weight"] = torch.randn(n_out, n_in, generator=generator) / math.sqrt(n_in)
        state[f"rm_head.{index}.bias"] = 0.1 * torch.randn(n_out, generator=generator)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def write_prompt_folder(folder: Path, train: list[str], test: list[str]) -> Path:
    """train.txt and test.txt at `folder`, one prompt a line: the authors' dataset/video layout."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, prompts in (("train.txt", train), ("test.txt", test)):
        (folder / name).write_text("".join(f"{prompt}\n" for prompt in prompts))
    return folder


def params_file(tmp_path: Path, preset: str = "tiny", **keys) -> Path:
    """The repository's params.yaml with `preset` selected and dotted keys (`a__b`) set, written to
    `tmp_path`."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    data = yaml.load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    data["preset"] = preset
    for dotted, value in keys.items():
        *parents, leaf = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "params.yaml"
    yaml.dump(data, path)
    return path
