"""The Wan 2.1 text-to-video stack: loading, saving, prompt encoding, decoding.

What it implements:
- `WanStack`, the four pieces GRPO needs (transformer, VAE, UMT5 text encoder, tokenizer);
- `load_stack` for a local Diffusers-format Wan 2.1 T2V folder (what users download as
  `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`), with a clear error naming what is missing;
- `save_stack`, the same folder layout, so the tiny random miniature (`random_stacks.py`) is
  loaded the way users load real weights;
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
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from flash_grpo_core.artifacts.atomic import atomic_directory
from flash_grpo_core.models.layout import ModelPathError, check_model_folder  # noqa: F401 - ModelPathError re-exported


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


def cast_like_from_pretrained(transformer: WanTransformer3DModel, dtype: torch.dtype) -> None:
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


def load_stack(path: str | os.PathLike, dtype: torch.dtype = torch.float32, max_text_len: int = 512,
               text_encoder: bool = True) -> WanStack:
    """Load a local Diffusers-format Wan 2.1 T2V folder; raises ModelPathError if it is incomplete or
    a component's files cannot be read (a truncated or foreign file, tensors of other shapes than
    its config.json gives), naming the component's files and the loader's reason.

    The transformer and text encoder are loaded in `dtype` by `from_pretrained` itself, which keeps
    the modules Wan needs in fp32 (`_keep_in_fp32_modules`); a later `.to(dtype)` would not. The
    VAE is always fp32, as in WanPipeline. `text_encoder=False` skips the UMT5 encoder (about 11 GB
    in bfloat16 for Wan 2.1), for callers that get prompt embeddings another way.
    """
    root = Path(path).expanduser().absolute()
    check_model_folder(root)
    with _component(root, "transformer"):
        transformer = WanTransformer3DModel.from_pretrained(
            root, subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )
    with _component(root, "vae"):
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
    encoder = None
    if text_encoder:
        with _component(root, "text_encoder"):  # transformers 5 names the argument `dtype`
            encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype, local_files_only=True)
    with _component(root, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    stack = WanStack(transformer, vae, encoder, tokenizer, max_text_len)
    freeze(stack)
    return stack


@contextlib.contextmanager
def _component(root: Path, name: str):
    """ModelPathError naming the component's files for what its loader raises on unreadable files:
    diffusers raises OSError for a bad safetensors header or a truncated file and ValueError naming
    the tensor for a shape that its config.json does not give; transformers likewise."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        files = sorted(file.name for file in (root / name).iterdir() if file.is_file())
        reason = " ".join(str(error).split())[:400]
        raise ModelPathError(f"Wan model folder {root}: cannot load {name}/ ({', '.join(files)}): "
                             f"{type(error).__name__}: {reason}") from error


def freeze(stack: WanStack) -> None:
    """Eval mode, no gradients: training code enables exactly what it trains."""
    for module in (stack.transformer, stack.vae, stack.text_encoder):
        if module is None:
            continue
        module.eval()
        module.requires_grad_(False)


def enable_checkpointing(transformer: WanTransformer3DModel, every: int = 1) -> None:
    """Activation checkpointing of every `every`-th transformer block (blocks 0, every, 2 x every, ...;
    diffusers' hook, torch's non-reentrant checkpoint as its default), the other blocks keeping their
    activations: each block left out saves one block's forward recomputation in the backward and
    holds its activations until then."""
    from torch.utils.checkpoint import checkpoint

    recomputed = {id(block) for index, block in enumerate(transformer.blocks) if index % every == 0}

    def run(block, *args):
        return checkpoint(block.__call__, *args, use_reentrant=False) if id(block) in recomputed else block(*args)

    transformer.enable_gradient_checkpointing(run)


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
