"""The Wan 2.1 text-to-video stack: loading, a tiny random twin, LoRA, prompt encoding, decoding.

What it implements:
- `WanStack`, the four pieces GRPO needs (transformer, VAE, UMT5 text encoder, tokenizer);
- `load_stack` for a local Diffusers-format Wan 2.1 T2V folder (what users download as
  `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`), with a clear error naming what is missing;
- `build_tiny_stack` / `save_stack`, a seconds-fast random miniature built entirely offline (the
  tokenizer too), saved in the same folder layout so tests exercise the loading path users take;
- LoRA through peft (`apply_lora`, `adapters_disabled` for the KL reference model);
- `encode_prompts` and `decode_latents`, which reproduce `diffusers.WanPipeline`'s text embedding
  (padded positions zeroed) and latent de-normalisation so that rollouts match the pipeline.

Departures from the pipeline: the scheduler is not part of the stack (the SDE sampler lives in its
own module), and the text encoder is loaded in the training dtype, not fixed to bf16.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from flash_grpo_core.atomic import atomic_directory
from flash_grpo_core.tokenizer import build_tokenizer  # noqa: F401 - part of this module's API

# Attention q/k/v/out of self- (attn1) and cross-attention (attn2) and both FFN projections, in
# diffusers' Wan block naming; peft matches them as name suffixes, so every block is covered.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

# The component folders `load_stack` needs. The scheduler folder is not among them: sampling uses
# this project's own SDE step.
_REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")

@dataclass
class WanStack:
    """The Wan 2.1 T2V components a GRPO run uses, plus the text length the encoder pads to.

    `vae` is None for a pixel-space model (the toy benchmark's): latents are then RGB pixels in
    [-1, 1], [3, F, H, W], and decoding is a rescale. `text_encoder` is None for a stack built
    without it (the update stage: its prompts come as the embeddings the rollout stored).
    """

    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan | None
    text_encoder: UMT5EncoderModel | None
    tokenizer: PreTrainedTokenizerBase
    max_text_len: int

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def vae_scale_spatial(self) -> int:
        """Pixels per latent along H and W (8 for the Wan 2.1 VAE, 1 in pixel space)."""
        if self.vae is None:
            return 1
        config = self.vae.config
        if config.get("scale_factor_spatial") is not None:
            return int(config["scale_factor_spatial"])
        # Older configs: every encoder stage but the last halves H and W, then optional patching.
        return 2 ** (len(config["dim_mult"]) - 1) * (config.get("patch_size") or 1)

    @property
    def vae_scale_temporal(self) -> int:
        """Pixel frames per latent frame after the first (4 for the Wan 2.1 VAE, 1 in pixel space)."""
        if self.vae is None:
            return 1
        config = self.vae.config
        if config.get("scale_factor_temporal") is not None:
            return int(config["scale_factor_temporal"])
        return 2 ** sum(bool(flag) for flag in config["temperal_downsample"])

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the latent for a clip of `num_frames` x `height` x `width` pixels."""
        # The causal VAE keeps the first frame on its own and compresses the rest in groups.
        latent_frames = (num_frames - 1) // self.vae_scale_temporal + 1
        return (
            self.latent_channels,
            latent_frames,
            height // self.vae_scale_spatial,
            width // self.vae_scale_spatial,
        )


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
        text_encoder = _small_text_encoder(tokenizer, d_model=32)
    _cast_like_from_pretrained(transformer, dtype)
    stack = WanStack(
        transformer=transformer,
        vae=vae,  # the VAE stays fp32, as WanPipeline runs it
        text_encoder=text_encoder.to(dtype),  # as transformers' from_pretrained(dtype=bf16) gives
        tokenizer=tokenizer,
        max_text_len=text_len,
    )
    _freeze(stack)
    return stack


def _small_text_encoder(tokenizer: PreTrainedTokenizerBase, d_model: int) -> UMT5EncoderModel:
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


def _cast_like_from_pretrained(transformer: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast in place as `from_pretrained(torch_dtype=dtype)` does.

    The modules Wan lists in `_keep_in_fp32_modules` (time embedding, modulation tables, norms)
    stay fp32; a plain `.to(dtype)` would cast them too (diffusers warns about exactly that).
    """
    keep_fp32 = transformer._keep_in_fp32_modules or []
    for name, param in transformer.named_parameters():
        if not any(module in name.split(".") for module in keep_fp32):
            param.data = param.data.to(dtype)


def save_stack(stack: WanStack, path: str | os.PathLike) -> None:
    """Write `stack` in the Diffusers folder layout that `WanPipeline.from_pretrained` reads.

    The folder is written under a temporary sibling name and renamed into place, so `path` never
    holds a half-written checkpoint; an existing folder at `path` is replaced.
    """
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Imported here: the pipeline package costs about a second of start-up that stages never need.
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipeline = WanPipeline(
        tokenizer=stack.tokenizer,
        text_encoder=stack.text_encoder,
        vae=stack.vae,
        scheduler=scheduler,
        transformer=stack.transformer,
    )
    with atomic_directory(target) as staging:
        pipeline.save_pretrained(staging)


class ModelPathError(FileNotFoundError):
    """`model.path` does not point at a complete Diffusers-format Wan 2.1 T2V folder."""


def _missing_parts(root: Path) -> list[str]:
    """What a Diffusers-format Wan folder at `root` lacks, as human-readable items."""
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for component in _REQUIRED_COMPONENTS:
        folder = root / component
        if not folder.is_dir():
            missing.append(f"{component}/ (folder)")
            continue
        if not (folder / "config.json").is_file():
            missing.append(f"{component}/config.json")
        if not any(file.name.endswith(_WEIGHT_SUFFIXES) for file in folder.iterdir()):
            missing.append(f"{component}/ weights (*.safetensors or *.bin)")
    tokenizer_folder = root / "tokenizer"
    if not tokenizer_folder.is_dir():
        missing.append("tokenizer/ (folder)")
    elif not any((tokenizer_folder / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer/ vocabulary (tokenizer.json or spiece.model)")
    return missing


def _check_model_folder(root: Path) -> None:
    hint = (
        "Set `model.path` in params.yaml to a local Diffusers-format Wan 2.1 T2V folder "
        "(e.g. a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."
    )
    if not root.is_dir():
        raise ModelPathError(f"Wan model folder {root} does not exist. {hint}")
    missing = _missing_parts(root)
    if missing:
        raise ModelPathError(f"Wan model folder {root} is incomplete: missing {', '.join(missing)}. {hint}")


def load_stack(path: str | os.PathLike, dtype: torch.dtype = torch.float32, max_text_len: int = 512,
               text_encoder: bool = True) -> WanStack:
    """Load a local Diffusers-format Wan 2.1 T2V folder; raises ModelPathError if it is incomplete.

    The transformer and text encoder are loaded in `dtype` by `from_pretrained` itself, which keeps
    the modules Wan needs in fp32 (`_keep_in_fp32_modules`); a later `.to(dtype)` would not. The
    VAE is always fp32, as in WanPipeline. `text_encoder=False` skips the UMT5 encoder (about 11 GB
    in bfloat16 for Wan 2.1), for callers that get prompt embeddings another way.
    """
    root = Path(path).expanduser().absolute()
    _check_model_folder(root)
    transformer = WanTransformer3DModel.from_pretrained(
        root, subfolder="transformer", torch_dtype=dtype, local_files_only=True
    )
    vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
    # transformers 5 names the argument `dtype` (diffusers still uses `torch_dtype`).
    encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype, local_files_only=True) \
        if text_encoder else None
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    stack = WanStack(transformer, vae, encoder, tokenizer, max_text_len)
    _freeze(stack)
    return stack


def _freeze(stack: WanStack) -> None:
    """Eval mode, no gradients: training code enables exactly what it trains."""
    for module in (stack.transformer, stack.vae, stack.text_encoder):
        if module is None:
            continue
        module.eval()
        module.requires_grad_(False)


def apply_lora(
    transformer: WanTransformer3DModel,
    rank: int = 16,
    alpha: int = 32,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    seed: int = 0,
) -> None:
    """Attach a LoRA adapter in place; afterwards only the LoRA weights require grad.

    The adapter starts as a no-op (peft's default init zeroes B). Its A matrices are drawn from a
    generator seeded by `seed` (peft draws from the global RNG), so runs are reproducible. LoRA
    weights are kept in fp32 even when the base is bf16: peft casts the input to the adapter's
    dtype and the result back.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    transformer.requires_grad_(False)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)


def enable_full_finetune(transformer: WanTransformer3DModel) -> None:
    """Make every transformer parameter trainable (full-weight GRPO instead of LoRA)."""
    transformer.requires_grad_(True)


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter for the parameters that require grad, sorted by name."""
    return {name: param for name, param in sorted(module.named_parameters()) if param.requires_grad}


@contextlib.contextmanager
def adapters_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """Run the transformer as its base model (the KL reference) inside the block.

    Restores each adapter layer's previous state afterwards, also on exception, and every
    parameter's `requires_grad`: peft's enable/disable toggles `requires_grad` of the adapter
    weights as a side effect. A no-op for a model without adapters.
    """
    layers = [module for module in transformer.modules() if isinstance(module, BaseTunerLayer)]
    grad_flags = [(param, param.requires_grad) for param in transformer.parameters()]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for param, flag in grad_flags:
            param.requires_grad_(flag)


@torch.no_grad()
def prompt_clean(text: str) -> str:
    """The prompt cleaning of diffusers' Wan pipeline (ftfy when installed, HTML unescaping twice,
    whitespace collapsed); restated here so that encoding prompts does not import the pipeline
    package. tests/test_models.py checks the embeddings against WanPipeline.encode_prompt."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def encode_prompts(stack: WanStack, prompts: list[str], device: torch.device | str) -> torch.Tensor:
    """UMT5 embeddings [B, L, D] as WanPipeline computes them, in the transformer's dtype.

    Padded positions are set to exactly zero after the encoder, as in
    `WanPipeline._get_t5_prompt_embeds` (the transformer's cross-attention sees them unmasked).
    """
    if stack.text_encoder is None:
        raise ValueError("this Wan stack was built without its text encoder; pass the prompts' stored embeddings")
    # Same cleaning as the pipeline (ftfy if installed, HTML unescape, whitespace), so training
    # embeddings equal inference ones for the same prompt.
    cleaned = [prompt_clean(prompt) for prompt in prompts]
    tokens = stack.tokenizer(
        cleaned,
        padding="max_length",
        max_length=stack.max_text_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    encoder_device = next(stack.text_encoder.parameters()).device
    input_ids = tokens.input_ids.to(encoder_device)  # [B, L]
    mask = tokens.attention_mask.to(encoder_device)  # [B, L]
    embeds = stack.text_encoder(input_ids, mask).last_hidden_state  # [B, L, D]
    embeds = embeds.masked_fill(~mask.bool().unsqueeze(-1), 0.0)  # [B, L, D]
    return embeds.to(device=device, dtype=stack.transformer.dtype)


@torch.no_grad()
def decode_latents(stack: WanStack, latents: torch.Tensor) -> torch.Tensor:
    """Decode normalised latents [B, C, F, H, W] to uint8 RGB video [B, (F-1)*4+1, 8H, 8W, 3] on CPU."""
    vae = stack.vae
    if vae is None:  # pixel space: the latents are the frames
        return to_uint8_video(latents)
    latents = latents.to(vae.device, vae.dtype)  # [B, C, F, H, W]
    # The latent space is normalised per channel; undo it exactly as WanPipeline.__call__ does
    # (dividing by 1/std rather than multiplying by std: the two differ in the last bit).
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    latents_inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    latents = latents / latents_inv_std + latents_mean
    video = vae.decode(latents, return_dict=False)[0]  # [B, 3, F_pixel, H_pixel, W_pixel] in [-1, 1]
    return to_uint8_video(video)


def to_uint8_video(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] video [B, 3, F, H, W] to uint8 [B, F, H, W, 3] on CPU, as diffusers' VideoProcessor maps it."""
    video = (video.float() / 2 + 0.5).clamp(0, 1)
    video = (video * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()
