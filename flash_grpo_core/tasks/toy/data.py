"""The toy task's data: prompts "a <colour> square moving <direction>" over the colour x direction
grid (`held_out` combinations never trained on, `rl_only` ones only by GRPO), and clips following
them: F frames of size x size RGB, black background, one square of side `square` in the prompted
colour moving `speed` pixels per frame in the prompted direction from a random start (with
`data_speeds` / `data_squares`, each clip draws its speed / side).
"""

from __future__ import annotations

import itertools

import torch

from flash_grpo_core.config import ToyConfig
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
