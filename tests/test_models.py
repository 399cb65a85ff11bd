"""Tests for flash_grpo_core.models (the Wan stack, LoRA) on the tiny random Wan stack (CPU, a few seconds in all).

Where the pipeline defines the behaviour (prompt embeddings, the checkpoint layout), the reference
is diffusers' own `WanPipeline`, not a re-statement of our code.
"""

import shutil
import time
from types import SimpleNamespace

import pytest
import torch
from diffusers import WanPipeline
from transformers import UMT5EncoderModel

from flash_grpo_core.models.lora import (
    DEFAULT_LORA_TARGETS,
    adapters_disabled,
    apply_lora,
    enable_full_finetune,
    trainable_parameters,
)
from flash_grpo_core.models.random_stacks import build_tiny_stack
from flash_grpo_core.models.tokenizer import build_tokenizer
from flash_grpo_core.models.wan import ModelPathError, WanStack, decode_latents, encode_prompts, load_stack, save_stack

# HTML entities and stray whitespace exercise the pipeline's prompt cleaning.
PROMPTS = ["  A red cat &amp; a dog run, 3 times! {x}~ (on a beach) ", ""]


def transformer_inputs(seed: int = 0, text_len: int = 16):
    """Latents [2, 16, 3, 4, 4] (9 frames of 32x32 pixels), timesteps [2], embeds [2, L, 32]."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 3, 4, 4, generator=generator)
    timesteps = torch.tensor([900.0, 250.0])
    embeds = torch.randn(2, text_len, 32, generator=generator)
    return latents, timesteps, embeds


def forward(stack: WanStack, latents, timesteps, embeds) -> torch.Tensor:
    return stack.transformer(latents, timesteps, embeds, return_dict=False)[0]


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_has_t5_special_ids_and_never_emits_unk():
    tokenizer = build_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    prompt = 'Zebra_42 jumps over "the" moon; 3.14% of #clouds @ 10:30 -- [wow]?'
    ids = tokenizer(prompt).input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt


def test_tokenizer_prefers_whole_words_over_characters():
    tokenizer = build_tokenizer()
    assert tokenizer.tokenize("a red cat") == ["\u2581a", "\u2581red", "\u2581cat"]


def test_tokenizer_pads_to_max_length_with_mask():
    tokenizer = build_tokenizer()
    batch = tokenizer(["a dog", ""], padding="max_length", max_length=6, truncation=True, return_tensors="pt")
    # "a dog" -> ▁a ▁dog </s> + 3 pads; "" -> </s> + 5 pads.
    assert batch.input_ids.tolist() == [
        [tokenizer.convert_tokens_to_ids("\u2581a"), tokenizer.convert_tokens_to_ids("\u2581dog"), 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]


# --- the tiny stack ---------------------------------------------------------------------------


def test_build_tiny_stack_is_deterministic_per_seed_and_fast():
    start = time.perf_counter()
    first = build_tiny_stack(seed=0)
    elapsed = time.perf_counter() - start
    again = build_tiny_stack(seed=0)
    other = build_tiny_stack(seed=1)
    assert elapsed < 2.0
    for name in ("transformer", "vae", "text_encoder"):
        assert state_dicts_equal(getattr(first, name), getattr(again, name)), name
        assert not state_dicts_equal(getattr(first, name), getattr(other, name)), name


def test_build_tiny_stack_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_stack(seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_stack_is_frozen_and_in_eval_mode():
    stack = build_tiny_stack()
    for module in (stack.transformer, stack.vae, stack.text_encoder):
        assert not module.training
        assert trainable_parameters(module) == {}
    assert len(stack.tokenizer) == stack.text_encoder.config.vocab_size


def test_tiny_stack_geometry_matches_wan():
    stack = build_tiny_stack()
    assert (stack.latent_channels, stack.vae_scale_spatial, stack.vae_scale_temporal) == (16, 8, 4)
    # 81 frames of 480x832 -> (81-1)//4+1 = 21 latent frames of 60x104 (the real Wan 2.1 shape).
    assert stack.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert stack.latent_shape(9, 32, 32) == (16, 3, 4, 4)


def test_vae_scales_fall_back_to_the_downsampling_config():
    # A VAE config without scale_factor_* (older exports): 4 stages -> 3 spatial halvings = 8;
    # two temporal downsamples -> 4.
    vae = SimpleNamespace(config={"dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]})
    stack = WanStack(transformer=None, vae=vae, text_encoder=None, tokenizer=None, max_text_len=8)
    assert (stack.vae_scale_spatial, stack.vae_scale_temporal) == (8, 4)


def test_transformer_forward_keeps_the_latent_shape():
    stack = build_tiny_stack()
    latents, timesteps, embeds = transformer_inputs()
    out = forward(stack, latents, timesteps, embeds)
    assert out.shape == latents.shape == (2, 16, 3, 4, 4)
    assert torch.isfinite(out).all()


def test_bf16_tiny_stack_keeps_wans_fp32_modules():
    stack = build_tiny_stack(dtype=torch.bfloat16)
    dtypes = {name: param.dtype for name, param in stack.transformer.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["scale_shift_table"] == torch.float32
    assert stack.vae.dtype == torch.float32


# --- prompts and decoding ---------------------------------------------------------------------


def test_encode_prompts_zeroes_padding_and_matches_wan_pipeline():
    stack = build_tiny_stack()
    embeds = encode_prompts(stack, PROMPTS, "cpu")
    assert embeds.shape == (2, stack.max_text_len, 32) and embeds.dtype == stack.transformer.dtype
    mask = stack.tokenizer(PROMPTS, padding="max_length", max_length=stack.max_text_len, truncation=True)
    mask = torch.tensor(mask.attention_mask, dtype=torch.bool)  # [B, L]
    assert mask[1].sum() == 1  # "" is just </s>
    assert (embeds[~mask] == 0).all()
    assert (embeds[mask].abs().sum(-1) > 0).all()

    pipeline = WanPipeline(
        tokenizer=stack.tokenizer,
        text_encoder=stack.text_encoder,
        vae=stack.vae,
        scheduler=None,
        transformer=stack.transformer,
    )
    with torch.no_grad():
        reference, _ = pipeline.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=stack.max_text_len, device="cpu"
        )
    assert torch.equal(embeds, reference)


def test_encode_prompts_truncates_long_prompts():
    stack = build_tiny_stack(text_len=8)
    embeds = encode_prompts(stack, ["a " * 50], "cpu")
    assert embeds.shape == (1, 8, 32)
    assert (embeds.abs().sum(-1) > 0).all()  # no padding left after truncation


def test_decode_latents_gives_uint8_frames_matching_the_pipeline_formula():
    stack = build_tiny_stack()
    latents, _, _ = transformer_inputs()
    video = decode_latents(stack, latents)
    assert video.dtype == torch.uint8 and video.device.type == "cpu"
    assert video.shape == (2, 9, 32, 32, 3)  # (3 - 1) * 4 + 1 frames, 4 * 8 pixels

    # Independent reference: de-normalise as x * std + mean, decode, map [-1, 1] -> [0, 255].
    config = stack.vae.config
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        pixels = stack.vae.decode(latents * std + mean, return_dict=False)[0]  # [B, 3, F, H, W]
    expected = ((pixels.permute(0, 2, 3, 4, 1) + 1) * 127.5).clamp(0, 255)
    # At most one grey level apart: 1/std vs std rounding and round-half ties.
    assert (video.float() - expected).abs().max() <= 1.0


# --- saving and loading -----------------------------------------------------------------------


def test_save_and_load_roundtrip_gives_identical_outputs(tmp_path):
    stack = build_tiny_stack(seed=3)
    path = tmp_path / "wan-tiny"
    save_stack(stack, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan-tiny"]  # no temporary left behind

    loaded = load_stack(path, max_text_len=stack.max_text_len)
    latents, timesteps, _ = transformer_inputs()
    embeds = encode_prompts(stack, PROMPTS, "cpu")
    assert torch.equal(encode_prompts(loaded, PROMPTS, "cpu"), embeds)
    with torch.no_grad():
        assert torch.equal(forward(loaded, latents, timesteps, embeds), forward(stack, latents, timesteps, embeds))
    assert state_dicts_equal(loaded.vae, stack.vae)
    assert not loaded.transformer.training and trainable_parameters(loaded.transformer) == {}


def test_saved_folder_is_what_wan_pipeline_reads(tmp_path):
    save_stack(build_tiny_stack(), tmp_path / "wan-tiny")
    pipeline = WanPipeline.from_pretrained(tmp_path / "wan-tiny", local_files_only=True)
    assert type(pipeline.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipeline.scheduler.config.flow_shift == 3.0
    assert pipeline.scheduler.config.prediction_type == "flow_prediction"


def test_failed_save_leaves_neither_folder_nor_temporary(tmp_path, monkeypatch):
    def save_half_then_fail(self, directory, **kwargs):
        (directory / "model_index.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(WanPipeline, "save_pretrained", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_stack(build_tiny_stack(), tmp_path / "wan-tiny")
    assert list(tmp_path.iterdir()) == []


def test_save_stack_replaces_an_existing_folder(tmp_path):
    path = tmp_path / "wan-tiny"
    save_stack(build_tiny_stack(seed=0), path)
    newer = build_tiny_stack(seed=1)
    save_stack(newer, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan-tiny"]
    assert state_dicts_equal(load_stack(path).transformer, newer.transformer)


def test_load_stack_without_text_encoder_never_reads_it(tmp_path, monkeypatch):
    """The update stage's load: the UMT5 weights stay on disk, the transformer is the same."""
    stack = build_tiny_stack(seed=3)
    save_stack(stack, tmp_path / "wan-tiny")

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", refuse)
    loaded = load_stack(tmp_path / "wan-tiny", text_encoder=False)
    assert loaded.text_encoder is None and state_dicts_equal(loaded.transformer, stack.transformer)
    with pytest.raises(ValueError, match="without its text encoder"):
        encode_prompts(loaded, PROMPTS, "cpu")


def test_load_stack_in_bf16_keeps_fp32_modules_and_an_fp32_vae(tmp_path):
    save_stack(build_tiny_stack(), tmp_path / "wan-tiny")
    loaded = load_stack(tmp_path / "wan-tiny", dtype=torch.bfloat16)
    assert loaded.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert loaded.transformer.scale_shift_table.dtype == torch.float32
    assert loaded.text_encoder.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32


def test_load_stack_on_a_missing_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "wan"
    with pytest.raises(ModelPathError) as error:
        load_stack(missing)
    assert str(missing) in str(error.value) and "model.path" in str(error.value)
    assert isinstance(error.value, FileNotFoundError)


@pytest.mark.parametrize("component", ["vae", "transformer", "text_encoder", "tokenizer"])
def test_load_stack_names_a_missing_component(tmp_path, component):
    path = tmp_path / "wan-tiny"
    save_stack(build_tiny_stack(), path)
    shutil.rmtree(path / component)
    with pytest.raises(ModelPathError, match=rf"missing {component}/") as error:
        load_stack(path)
    assert str(path) in str(error.value)


def test_load_stack_names_missing_weights_and_model_index(tmp_path):
    path = tmp_path / "wan-tiny"
    save_stack(build_tiny_stack(), path)
    for weights in (path / "transformer").glob("*.safetensors"):
        weights.unlink()
    (path / "model_index.json").unlink()
    with pytest.raises(ModelPathError) as error:
        load_stack(path)
    assert "model_index.json" in str(error.value) and "transformer/ weights" in str(error.value)
    assert "vae" not in str(error.value)


# --- LoRA and full fine-tuning ----------------------------------------------------------------


def test_apply_lora_trains_only_lora_weights_and_starts_as_a_no_op():
    stack = build_tiny_stack()
    latents, timesteps, embeds = transformer_inputs()
    with torch.no_grad():
        base = forward(stack, latents, timesteps, embeds)
    apply_lora(stack.transformer, rank=4, alpha=8)

    trainable = trainable_parameters(stack.transformer)
    assert list(trainable) == sorted(trainable)
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # The authors' targets: 2 blocks x (attn1 + attn2: q, k, v, out = 8) x (A, B) = 32; no FFN.
    assert DEFAULT_LORA_TARGETS == ("to_q", "to_k", "to_v", "to_out.0")
    assert len(trainable) == 2 * 8 * 2
    assert not any(".ffn." in name for name in trainable)
    for attention in ("attn1", "attn2"):
        for target in DEFAULT_LORA_TARGETS:
            assert f"blocks.1.{attention}.{target}.lora_B.default.weight" in trainable, (attention, target)
    with torch.no_grad():
        assert torch.equal(forward(stack, latents, timesteps, embeds), base)


def _lora_a(transformer) -> torch.Tensor:
    """Every LoRA A entry, flattened."""
    return torch.cat([p.detach().flatten() for n, p in trainable_parameters(transformer).items() if ".lora_A." in n])


def test_lora_a_is_gaussian_with_std_one_over_rank_and_seeded():
    # peft's "gaussian": A ~ N(0, 1/r^2), so std 1/16 = 0.0625 at r = 16; 16 adapted projections x 16 x 24
    # inputs = 6144 draws put the sample std within about 1% of it. B is zero, so the adapter is a no-op.
    stack = build_tiny_stack()
    apply_lora(stack.transformer, rank=16, alpha=32, seed=3)
    a = _lora_a(stack.transformer)
    assert a.numel() == 16 * 16 * 24
    assert a.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert a.abs().max() > 1 / 24**0.5  # beyond peft's kaiming-uniform bound 1/sqrt(fan_in): not uniform
    b = [p for n, p in trainable_parameters(stack.transformer).items() if ".lora_B." in n]
    assert all(torch.count_nonzero(p) == 0 for p in b)
    again, other = build_tiny_stack(), build_tiny_stack()
    apply_lora(again.transformer, rank=16, alpha=32, seed=3)
    apply_lora(other.transformer, rank=16, alpha=32, seed=4)
    assert torch.equal(_lora_a(again.transformer), a)
    assert not torch.equal(_lora_a(other.transformer), a)


def test_lora_default_init_is_peft_kaiming_uniform():
    # kaiming_uniform(a = sqrt(5)) on fan_in 24: U(-1/sqrt(24), 1/sqrt(24)), std 1/sqrt(3 * 24) = 0.118
    stack = build_tiny_stack()
    apply_lora(stack.transformer, rank=16, alpha=32, init="default")
    a = _lora_a(stack.transformer)
    assert a.abs().max() <= 1 / 24**0.5
    assert a.std().item() == pytest.approx(1 / (3 * 24) ** 0.5, rel=0.05)
    with pytest.raises(ValueError, match="unknown LoRA init 'kaiming'"):
        apply_lora(build_tiny_stack().transformer, init="kaiming")


def test_make_trainable_applies_the_configured_targets_and_init(tiny_params):
    from flash_grpo_core.engine.iteration import make_trainable

    stack = build_tiny_stack()
    make_trainable(stack.transformer, tiny_params())  # the params' defaults: the authors' recipe
    names = list(trainable_parameters(stack.transformer))
    assert len(names) == 32 and not any(".ffn." in name for name in names)
    assert _lora_a(stack.transformer).std().item() == pytest.approx(1 / 16, rel=0.05)
    custom = build_tiny_stack()
    make_trainable(custom.transformer, tiny_params(model__lora_targets=["to_q", "ffn.net.2"], model__lora_init="default"))
    names = list(trainable_parameters(custom.transformer))
    # attn1.to_q, attn2.to_q and ffn.net.2 in 2 blocks x (A, B) = 12
    assert len(names) == 12 and sum(".ffn.net.2." in name for name in names) == 4
    assert _lora_a(custom.transformer).abs().max() <= 1 / 24**0.5


def test_adapters_disabled_gives_the_base_model_and_restores_state():
    stack = build_tiny_stack()
    latents, timesteps, embeds = transformer_inputs()
    with torch.no_grad():
        base = forward(stack, latents, timesteps, embeds)
    apply_lora(stack.transformer, rank=4, alpha=8)
    with torch.no_grad():
        stack.transformer.blocks[0].attn1.to_q.lora_B["default"].weight.fill_(0.5)
        tuned = forward(stack, latents, timesteps, embeds)
        assert not torch.allclose(tuned, base)
        with adapters_disabled(stack.transformer):
            assert torch.equal(forward(stack, latents, timesteps, embeds), base)
        assert torch.equal(forward(stack, latents, timesteps, embeds), tuned)

    trainable_before = list(trainable_parameters(stack.transformer))
    with pytest.raises(RuntimeError), adapters_disabled(stack.transformer):
        raise RuntimeError("reference forward failed")
    with torch.no_grad():
        assert torch.equal(forward(stack, latents, timesteps, embeds), tuned)
    assert list(trainable_parameters(stack.transformer)) == trainable_before


def test_adapters_disabled_keeps_frozen_lora_weights_frozen():
    stack = build_tiny_stack()
    apply_lora(stack.transformer, rank=4, alpha=8)
    stack.transformer.requires_grad_(False)  # e.g. a LoRA used as a fixed reference
    with adapters_disabled(stack.transformer):
        pass
    assert trainable_parameters(stack.transformer) == {}


def test_adapters_disabled_is_a_no_op_without_adapters():
    stack = build_tiny_stack()
    latents, timesteps, embeds = transformer_inputs()
    with torch.no_grad():
        base = forward(stack, latents, timesteps, embeds)
        with adapters_disabled(stack.transformer):
            assert torch.equal(forward(stack, latents, timesteps, embeds), base)


def test_lora_on_a_bf16_base_is_fp32_and_receives_gradients():
    stack = build_tiny_stack(dtype=torch.bfloat16)
    apply_lora(stack.transformer, rank=4, alpha=8)
    trainable = trainable_parameters(stack.transformer)
    assert {param.dtype for param in trainable.values()} == {torch.float32}
    assert stack.transformer.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16

    latents, timesteps, embeds = transformer_inputs()
    out = forward(stack, latents.bfloat16(), timesteps, embeds.bfloat16())
    out.float().square().mean().backward()
    # With B = 0 only B gets a gradient at init (dL/dA = B^T ...), and it must be non-zero.
    lora_b_grads = [param.grad for name, param in trainable.items() if ".lora_B." in name]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in lora_b_grads)


def test_lora_computed_in_the_input_dtype_skips_the_float32_casts_and_keeps_float32_weights():
    """`compute="input"`: the adapters multiply in the layer input's dtype (bf16 over a bf16 base)
    instead of peft casting the input to float32; same parameters (float32, same names), trained
    through the cast, close to peft's path; over a float32 base the very same computation."""
    def run(dtype, compute):
        stack = build_tiny_stack(dtype=dtype)
        apply_lora(stack.transformer, rank=4, alpha=8, compute=compute)
        trainable = trainable_parameters(stack.transformer)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # B is zero at init: a trained-looking adapter, the same for both ways
            for name, param in trainable.items():
                if ".lora_B." in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        seen = []
        stack.transformer.blocks[0].attn1.to_q.lora_A["default"].register_forward_hook(
            lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
        latents, timesteps, embeds = transformer_inputs()
        out = forward(stack, latents.to(dtype), timesteps, embeds.to(dtype))
        out.float().square().mean().backward()
        return out.detach().float(), {name: param.grad for name, param in trainable.items()}, trainable, seen

    peft_out, peft_grads, peft_params, peft_seen = run(torch.bfloat16, "float32")
    out, grads, params, seen = run(torch.bfloat16, "input")
    assert peft_seen[0] == (torch.float32, torch.float32) and seen[0] == (torch.bfloat16, torch.bfloat16)
    assert list(params) == list(peft_params) and {p.dtype for p in params.values()} == {torch.float32}
    assert {g.dtype for g in grads.values()} == {torch.float32}
    # 2% of the output range; the adapter itself moves the output by about a quarter of it
    torch.testing.assert_close(out, peft_out, rtol=0, atol=0.02 * peft_out.abs().max().item())
    assert not torch.equal(out, peft_out)  # the products did run in bf16
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), peft_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)
    float32, input_dtype = run(torch.float32, "float32"), run(torch.float32, "input")
    assert torch.equal(float32[0], input_dtype[0])
    assert all(torch.equal(float32[1][name], input_dtype[1][name]) for name in float32[1])
    with pytest.raises(ValueError, match="unknown LoRA compute 'bf16'"):
        apply_lora(build_tiny_stack().transformer, compute="bf16")


def test_enable_full_finetune_makes_every_transformer_weight_trainable():
    stack = build_tiny_stack()
    enable_full_finetune(stack.transformer)
    names = {name for name, _ in stack.transformer.named_parameters()}
    assert set(trainable_parameters(stack.transformer)) == names
    assert trainable_parameters(stack.text_encoder) == {}


@pytest.mark.parametrize("arch,billions", [("wan1_3b", 1.419), ("wan14b", 14.288)])
def test_random_wan_architectures_have_the_released_sizes(arch, billions):
    from flash_grpo_core.models.random_stacks import build_random_stack

    stack = build_random_stack(arch, device="meta")  # shapes only: no memory, no time
    params = sum(p.numel() for p in stack.transformer.parameters())
    assert params / 1e9 == pytest.approx(billions, abs=0.001)
    assert stack.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert len(build_random_stack(arch, device="meta", num_layers=2).transformer.blocks) == 2  # a cut-down proxy
