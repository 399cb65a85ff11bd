"""Prompt embeddings stored with the rollouts: exact round trip, compact, byte-stable, clear errors."""

import pytest
import torch

from flash_grpo_core.artifacts.prompt_embeds import FILE_NAME, load_prompt_embeds, save_prompt_embeds
from flash_grpo_core.artifacts.tar_io import ShardError
from flash_grpo_core.engine.iteration import build_engine, encode

PROMPTS = ["a red fox jumps over snow", "two boats", "a city at night, neon lights reflecting in rain puddles"]


@pytest.fixture
def encoded(tiny_params):
    engine = build_engine(tiny_params())
    return engine, encode(engine, PROMPTS)


def test_round_trip_is_exact_in_any_prompt_order(encoded, tmp_path):
    engine, (cond, uncond) = encoded
    assert cond.shape[1] == engine.stack.max_text_len and uncond is not None
    path = save_prompt_embeds(tmp_path, PROMPTS, cond, uncond)
    assert path.name == FILE_NAME
    order = [2, 0, 1]
    loaded, loaded_uncond = load_prompt_embeds(tmp_path, [PROMPTS[i] for i in order])
    assert loaded.dtype == cond.dtype and torch.equal(loaded, cond[order])
    assert torch.equal(loaded_uncond, uncond)


def test_padding_is_not_stored(encoded, tmp_path):
    """Only the positions some prompt uses are written: the short prompts' zero padding is not."""
    from safetensors import safe_open

    _, (cond, _) = encoded
    short = ["two boats"]
    save_prompt_embeds(tmp_path, short, cond[1:2], None)
    with safe_open(str(tmp_path / FILE_NAME), framework="pt") as handle:
        stored = handle.get_tensor("cond")
    assert 0 < stored.shape[1] < cond.shape[1]
    assert torch.equal(load_prompt_embeds(tmp_path, short)[0], cond[1:2])


def test_same_embeddings_give_the_same_bytes(encoded, tmp_path):
    _, (cond, uncond) = encoded
    first = save_prompt_embeds(tmp_path / "a", PROMPTS, cond, uncond).read_bytes()
    second = save_prompt_embeds(tmp_path / "b", PROMPTS, cond.clone(), uncond.clone()).read_bytes()
    assert first == second


def test_missing_truncated_and_foreign_files_are_named(encoded, tmp_path):
    _, (cond, uncond) = encoded
    with pytest.raises(ShardError, match=f"{FILE_NAME}: missing"):
        load_prompt_embeds(tmp_path, PROMPTS)
    path = save_prompt_embeds(tmp_path, PROMPTS, cond, uncond)
    with pytest.raises(ShardError, match="holds no embedding for prompt"):
        load_prompt_embeds(tmp_path, ["a prompt of another rollout"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=f"{FILE_NAME}: not a readable prompt embeddings file"):
        load_prompt_embeds(tmp_path, PROMPTS)


def test_engine_without_text_encoder_has_the_same_transformer(tiny_params, encoded):
    engine, _ = encoded
    bare = build_engine(tiny_params(), text_encoder=False)
    assert bare.stack.text_encoder is None
    full = engine.policy.transformer.state_dict()
    assert all(torch.equal(full[name], value) for name, value in bare.policy.transformer.state_dict().items())
    with pytest.raises(ValueError, match="without its text encoder"):
        encode(bare, PROMPTS)
