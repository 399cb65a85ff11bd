"""The alignment benchmark's task: coloured squares moving in a direction, in pixel space.

- Data: clips of F frames, size x size RGB, black background, one square of side `square` in the
  prompted colour moving `speed` pixels per frame in the prompted direction from a random start.
  Prompts are "a <colour> square moving <direction>"; `held_out` combinations are never trained on,
  `rl_only` ones only by GRPO (not pre-trained on); with `data_speeds` (`data_squares`) each clip
  draws its speed (its square's side).
- Model: a small real `WanTransformer3DModel` over RGB pixels in [-1, 1] (no VAE: a random VAE
  would make the latent space meaningless), the tiny UMT5 encoder and the code-built tokenizer,
  all seeded by `toy.seed` so every GRPO run starts from the same base.
- Pre-training: the flow-matching loss with training sigmas shifted towards high noise (where
  the layout is decided), and prompt dropout for classifier-free guidance.
- Reward `toy_following`: rule-based and dense, three components in [0, 1], each reported alone:
  `color` (the object's colour vs the prompt's), `single` (one compact object of the right size),
  `motion` (the object's centroid moving in the prompted direction at the prompted speed).
"""

from __future__ import annotations

import itertools
import math

import torch

from flash_grpo_core.config import ToyConfig
from flash_grpo_core.rewards.base import RewardOutput, check_videos, register
from flash_grpo_core.rewards.offline import COLORS

# The toy's colours, 0..255, taken from the colour-matching reward's table (0..1).
PALETTE = {name: tuple(round(255 * c) for c in COLORS[name])
           for name in ("red", "green", "blue", "yellow", "magenta", "cyan", "white")}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per frame


def prompt_for(color: str, direction: str) -> str:
    return f"a {color} square moving {direction}"


def parse_prompt(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    color = next((w for w in words if w in PALETTE), None)
    direction = next((w for w in words if w in DIRECTIONS), None)
    if color is None or direction is None:
        raise ValueError(f"not a toy prompt (no colour or direction word): {prompt!r}")
    return color, direction


def toy_prompts(cfg: ToyConfig) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts) over every colour x direction combination."""
    held = {tuple(combo.split()) for combo in cfg.held_out}
    combos = list(itertools.product(cfg.colors, cfg.directions))
    return ([prompt_for(c, d) for c, d in combos if (c, d) not in held],
            [prompt_for(c, d) for c, d in combos if (c, d) in held])


def rl_only_prompts(cfg: ToyConfig) -> list[str]:
    """The train prompts kept out of pre-training (`toy.rl_only`): GRPO's reward alone teaches them."""
    return [prompt_for(*combo.split()) for combo in cfg.rl_only]


def pretrain_prompts(cfg: ToyConfig) -> list[str]:
    """The train prompts the base is pre-trained on: all but the `rl_only` ones."""
    rl_only = set(rl_only_prompts(cfg))
    return [p for p in toy_prompts(cfg)[0] if p not in rl_only]


def _draw(choices: tuple[int, ...], default: int, generator: torch.Generator) -> int:
    """One of `choices`, drawn with `generator`; `default` without drawing when there are none."""
    return choices[int(torch.randint(len(choices), (1,), generator=generator))] if choices else default


def make_clips(prompts: list[str], cfg: ToyConfig, generator: torch.Generator) -> torch.Tensor:
    """Clips [B, 3, F, size, size] in [-1, 1] following `prompts`, random start positions."""
    clips = torch.full((len(prompts), 3, cfg.frames, cfg.size, cfg.size), -1.0)
    for b, prompt in enumerate(prompts):
        color, direction = parse_prompt(prompt)
        (dy, dx), rgb = DIRECTIONS[direction], torch.tensor(PALETTE[color]) / 127.5 - 1
        speed, side = _draw(cfg.data_speeds, cfg.speed, generator), _draw(cfg.data_squares, cfg.square, generator)
        span = cfg.size - side - speed * (cfg.frames - 1)  # room left for the start position
        y0, x0 = (int(v) for v in torch.randint(span + 1, (2,), generator=generator))
        # start so that the whole path stays inside the frame
        y0 += speed * (cfg.frames - 1) if dy < 0 else 0
        x0 += speed * (cfg.frames - 1) if dx < 0 else 0
        for f in range(cfg.frames):
            y, x = y0 + dy * speed * f, x0 + dx * speed * f
            clips[b, :, f, y:y + side, x:x + side] = rgb.view(3, 1, 1)
    return clips


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


@register("toy_following")
class ToyFollowingReward:
    """Rule-based prompt following for the toy task; components in [0, 1], total their weighted mean.

    - `color`: per frame, 1 - distance between the object pixels' mean colour and the prompt's
      colour (normalised by the largest possible distance); 0 for a frame with no object.
    - `single`: per frame, exp(-|pixels - square^2| / square^2) x the fraction of object pixels
      within a box of side square + 2 around their centroid: one compact square of the right size.
    - `motion`: exp(-|v - speed d|^2 / speed^2) for the centroid's mean velocity v between the first
      and last frames with an object and the prompted direction d (0.37 for a static object).
    Hacking it: a bigger or brighter blob keeps `color` while losing `single`; the benchmark reports
    each component so such a trade is visible.
    """

    name = "toy_following"

    def __init__(self, square: int = 4, speed: int = 1, threshold: int = 100,
                 weights: dict[str, float] | None = None, frame_stride: int = 1):
        self.square, self.speed, self.threshold = square, speed, threshold
        self.weights = weights or {"color": 1.0, "single": 1.0, "motion": 1.0}

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata=None) -> RewardOutput:
        check_videos(videos)
        frames = videos.float()  # [B, F, H, W, 3]
        mask = frames.amax(dim=-1) > self.threshold  # [B, F, H, W] object pixels
        count = mask.sum(dim=(2, 3)).float()  # [B, F]
        present = count > 0
        targets = torch.tensor([PALETTE[parse_prompt(p)[0]] for p in prompts], dtype=torch.float32)  # [B, 3]
        directions = torch.tensor([DIRECTIONS[parse_prompt(p)[1]] for p in prompts], dtype=torch.float32)
        mean_rgb = (frames * mask.unsqueeze(-1)).sum(dim=(2, 3)) / count.clamp(min=1).unsqueeze(-1)  # [B, F, 3]
        distance = (mean_rgb - targets.unsqueeze(1)).norm(dim=-1) / (255 * math.sqrt(3))
        color = ((1 - distance) * present).mean(dim=1)
        centroid = self._centroids(mask, count)  # [B, F, 2] (y, x)
        single = (self._compactness(mask, centroid, count) * present).mean(dim=1)
        motion = self._motion(centroid, present, directions)
        components = {"color": color, "single": single, "motion": motion}
        total = sum(self.weights[k] * components[k] for k in self.weights) / sum(self.weights.values())
        return RewardOutput(scores=total.float(), info={k: v.float() for k, v in components.items()})

    @staticmethod
    def _centroids(mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        height, width = mask.shape[-2:]
        ys = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1)
        denominator = count.clamp(min=1)
        return torch.stack([(mask * ys).sum(dim=(2, 3)) / denominator, (mask * xs).sum(dim=(2, 3)) / denominator], -1)

    def _compactness(self, mask: torch.Tensor, centroid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        height, width = mask.shape[-2:]
        ys = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1)
        half = self.square / 2 + 1
        inside = ((ys - centroid[..., 0, None, None]).abs() <= half) & ((xs - centroid[..., 1, None, None]).abs() <= half)
        fraction = (mask & inside).sum(dim=(2, 3)) / count.clamp(min=1)  # [B, F]
        area = self.square**2
        return torch.exp(-(count - area).abs() / area) * fraction

    def _motion(self, centroid: torch.Tensor, present: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(centroid.shape[0])
        for b in range(centroid.shape[0]):
            frames = torch.nonzero(present[b]).flatten()
            if len(frames) < 2:
                continue
            first, last = frames[0], frames[-1]
            velocity = (centroid[b, last] - centroid[b, first]) / (last - first).float()  # (vy, vx) per frame
            error = (velocity - self.speed * directions[b]).pow(2).sum() / max(self.speed, 1) ** 2
            scores[b] = torch.exp(-error)
        return scores
