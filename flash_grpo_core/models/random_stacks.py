"""Wan 2.1 stacks with random weights, built offline in seconds.

- `build_tiny_stack`: a miniature of the real architecture (transformer, VAE, UMT5 encoder, the
  code-built tokenizer) for the `tiny` preset and the tests;
- `build_random_stack`: Wan 2.1's real transformer and VAE architectures with random weights, for
  measuring compute and memory without the weights (bench/costs/iteration_cost.py).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from flash_grpo_core.models.layout import WAN_SHARED_CONFIG, WAN_TRANSFORMER_CONFIGS
from flash_grpo_core.models.tokenizer import build_tokenizer
from flash_grpo_core.models.wan import WanStack, cast_like_from_pretrained, freeze


def build_random_stack(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, text_len: int = 512,
                       device: torch.device | str = "cpu", num_layers: int | None = None) -> WanStack:
    """Wan 2.1's real transformer and VAE architectures with random weights, built on `device`.

    For measuring compute and memory without the weights. The 6.7B UMT5-XXL encoder is replaced by
    a small random encoder of the same output width (4096): it runs once per prompt and does not
    change what a training step costs. `num_layers` keeps only that many transformer blocks (a
    block's cost at the real width, on a machine that cannot run all of them).
    """
    if arch not in WAN_TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(WAN_TRANSFORMER_CONFIGS)}")
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        config = dict(WAN_TRANSFORMER_CONFIGS[arch], **({"num_layers": num_layers} if num_layers else {}))
        transformer = WanTransformer3DModel(**WAN_SHARED_CONFIG, **config)
        vae = AutoencoderKLWan()
        text_encoder = small_text_encoder(tokenizer, d_model=WAN_SHARED_CONFIG["text_dim"])
    cast_like_from_pretrained(transformer, dtype)
    stack = WanStack(transformer, vae, text_encoder.to(dtype), tokenizer, text_len)
    freeze(stack)
    return stack


def build_tiny_stack(seed: int = 0, dtype: torch.dtype = torch.float32, text_len: int = 16) -> WanStack:
    """A randomly initialised miniature of the Wan 2.1 T2V stack, deterministic for `seed`.

    Sizes follow diffusers' own Wan pipeline tests; the text encoder's `d_model` must equal the
    transformer's `text_dim` (32). Latents are [C=16, F, H/8, W/8]; `num_frames - 1` must be a
    multiple of 4 and H, W multiples of 16 (VAE factor 8 x patch 2).
    """
    tokenizer = build_tokenizer()
    # fork_rng restores the caller's CPU generator afterwards; devices=[] leaves CUDA untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        text_encoder = small_text_encoder(tokenizer, d_model=32)
    cast_like_from_pretrained(transformer, dtype)
    stack = WanStack(
        transformer=transformer,
        vae=vae,  # the VAE stays fp32, as WanPipeline runs it
        text_encoder=text_encoder.to(dtype),  # as transformers' from_pretrained(dtype=bf16) gives
        tokenizer=tokenizer,
        max_text_len=text_len,
    )
    freeze(stack)
    return stack


def small_text_encoder(tokenizer: PreTrainedTokenizerBase, d_model: int) -> UMT5EncoderModel:
    """A 2-layer random UMT5 encoder over the code-built tokenizer, `d_model` wide."""
    config = UMT5Config(
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        vocab_size=len(tokenizer),
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return UMT5EncoderModel(config)
