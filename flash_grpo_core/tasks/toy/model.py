"""The toy task's model: a small real `WanTransformer3DModel` over RGB pixels in [-1, 1] (no VAE: a
random VAE would make the latent space meaningless), the tiny UMT5 encoder and the code-built
tokenizer, all seeded by `toy.seed` so every GRPO run starts from the same base; its pre-training
(the flow-matching loss with training sigmas shifted towards high noise, where the layout is
decided, and prompt dropout for classifier-free guidance) and the base's files.
"""

from __future__ import annotations

import torch

from flash_grpo_core.config import ToyConfig
from flash_grpo_core.tasks.toy.data import make_clips, pretrain_prompts


def build_toy_stack(cfg: ToyConfig, dtype: torch.dtype = torch.float32, text_len: int = 16):
    """The pixel-space Wan stack, deterministic for `cfg.seed` (vae None)."""
    from diffusers import WanTransformer3DModel

    from flash_grpo_core.models.random_stacks import small_text_encoder
    from flash_grpo_core.models.tokenizer import build_tokenizer
    from flash_grpo_core.models.wan import WanStack, cast_like_from_pretrained, freeze

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, cfg.patch, cfg.patch), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
            in_channels=3, out_channels=3, text_dim=32, freq_dim=64, ffn_dim=cfg.ffn_dim, num_layers=cfg.layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        text_encoder = small_text_encoder(tokenizer, d_model=32)
    cast_like_from_pretrained(transformer, dtype)
    stack = WanStack(transformer, None, text_encoder, tokenizer, text_len)
    freeze(stack)
    return stack


BASE_WEIGHTS = "transformer.safetensors"


def save_base(stack, directory, summary: dict) -> None:
    """The pre-trained transformer (safetensors) and a JSON summary, each written atomically."""
    from pathlib import Path

    from safetensors.torch import save_file

    from flash_grpo_core.artifacts.atomic import atomic_path, write_json

    directory = Path(directory)
    with atomic_path(directory / BASE_WEIGHTS) as temporary:
        save_file({k: v.contiguous() for k, v in stack.transformer.state_dict().items()}, temporary)
    write_json(summary, directory / "pretrain.json")


def load_base(stack, directory) -> None:
    """Load pre-trained transformer weights from `directory` (the pretrain stage's output); a
    ModelPathError naming the file (and the tensor) when it is unreadable or does not fit the model."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from flash_grpo_core.models.wan import ModelPathError

    path = Path(directory) / BASE_WEIGHTS
    if not path.is_file():
        raise ModelPathError(f"toy base model {path} does not exist: the shipped one is bench/toy/base (restore it "
                             f"with `git checkout bench/toy/base`, or pre-train one: see bench/toy/dvc.yaml), or "
                             f"set presets.toy.model.path to null for an untrained toy model")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ModelPathError(f"toy base model {path}: not a readable safetensors file ({error}); restore it with "
                             f"`git checkout bench/toy/base`") from error
    expected = stack.transformer.state_dict()
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ModelPathError(f"toy base model {path} does not fit the toy section's model: {len(missing)} tensor(s) "
                             f"missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ModelPathError(f"toy base model {path}: tensor {name} has shape {tuple(tensor.shape)}, the toy "
                                 f"section's model expects {tuple(expected[name].shape)} (toy.layers, heads, "
                                 f"head_dim, ffn_dim, patch must be those it was pre-trained with)")
    stack.transformer.load_state_dict(weights)


def pretrain(stack, cfg: ToyConfig, steps: int | None = None, progress=None) -> list[float]:
    """Flow-matching pre-training of `stack.transformer` in place; returns the loss per step."""
    from flash_grpo_core.models.wan import encode_prompts

    train_prompts = pretrain_prompts(cfg)
    embeds = encode_prompts(stack, [*train_prompts, ""], "cpu")  # [P + 1, L, D], last = unconditional
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    model = stack.transformer.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    losses = []
    for _ in range(cfg.pretrain_steps if steps is None else steps):
        index = torch.randint(len(train_prompts), (cfg.pretrain_batch,), generator=generator)
        clips = make_clips([train_prompts[i] for i in index], cfg, generator)  # [B, 3, F, H, W]
        noise = torch.randn(clips.shape, generator=generator)
        u = torch.rand(cfg.pretrain_batch, generator=generator)
        sigma = cfg.pretrain_shift * u / (1 + (cfg.pretrain_shift - 1) * u)  # [B]
        noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * clips + sigma.view(-1, 1, 1, 1, 1) * noise
        drop = torch.rand(cfg.pretrain_batch, generator=generator) < cfg.uncond_prob
        context = embeds[torch.where(drop, torch.full_like(index, len(train_prompts)), index)]
        velocity = model(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=context,
                         return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(velocity.float(), noise - clips)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    model.requires_grad_(False).eval()
    return losses


def build_stack(params, dtype: torch.dtype):
    """The `toy` preset's model (the task's `model` target): the pixel-space stack, and the
    pre-trained base from `model.path` when set."""
    stack = build_toy_stack(params.toy, dtype=dtype, text_len=params.model.text_len)
    if params.model.path:
        load_base(stack, params.model.path)
    return stack
