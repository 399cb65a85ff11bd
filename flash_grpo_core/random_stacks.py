"""Wan 2.1's real transformer and VAE architectures with random weights, for measuring compute and
memory without the weights (bench/iteration_cost.py)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from flash_grpo_core.models import WanStack, _cast_like_from_pretrained, _freeze, _small_text_encoder
from flash_grpo_core.tokenizer import build_tokenizer

# Wan 2.1 T2V transformer configurations (Diffusers format); the VAE's defaults are Wan 2.1's VAE.
WAN_TRANSFORMER_CONFIGS = {
    "wan1_3b": {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30},
    "wan14b": {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40},
}
_WAN_SHARED_CONFIG = {
    "patch_size": (1, 2, 2), "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}


def build_random_stack(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, text_len: int = 512,
                       device: torch.device | str = "cpu") -> WanStack:
    """Wan 2.1's real transformer and VAE architectures with random weights, built on `device`.

    For measuring compute and memory without the weights. The 6.7B UMT5-XXL encoder is replaced by
    a small random encoder of the same output width (4096): it runs once per prompt and does not
    change what a training step costs.
    """
    if arch not in WAN_TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(WAN_TRANSFORMER_CONFIGS)}")
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**_WAN_SHARED_CONFIG, **WAN_TRANSFORMER_CONFIGS[arch])
        vae = AutoencoderKLWan()
        text_encoder = _small_text_encoder(tokenizer, d_model=_WAN_SHARED_CONFIG["text_dim"])
    _cast_like_from_pretrained(transformer, dtype)
    stack = WanStack(transformer, vae, text_encoder.to(dtype), tokenizer, text_len)
    _freeze(stack)
    return stack
