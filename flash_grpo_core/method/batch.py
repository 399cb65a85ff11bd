"""What a rollout keeps for training (SPEC 4), and the compute count every mode logs (SPEC 6).

`RolloutBatch` is the in-memory form of one iteration's rollouts: the sampler produces it, the
update consumes it, and `artifacts/rollout_records.py` converts it to and from the on-disk records.
It lives here, below both the engine and the artifacts, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PassCounter:
    """Transformer passes in sample units: a CFG call on S latents counts 2S forwards."""

    forward: int = 0
    backward: int = 0
    last_forward: int = 0  # sample passes of the latest call, which a backward through it repeats

    def as_dict(self) -> dict[str, int]:
        return {"forward_passes": self.forward, "backward_passes": self.backward}

    def add(self, other: "PassCounter") -> None:
        self.forward += other.forward
        self.backward += other.backward


@dataclass
class RolloutBatch:
    """What training needs from one iteration's rollouts (S = B * G samples, T trained steps each)."""

    prompt_index: torch.Tensor  # [S] long, into the iteration's prompt list
    steps: torch.Tensor  # [S, T] long, trained step indices
    latents: torch.Tensor  # [S, T, C, F, H, W] x_{t_k}
    next_latents: torch.Tensor  # [S, T, C, F, H, W] x_{t_{k+1}}
    log_probs: torch.Tensor  # [S, T] float32, log p_old
    final_latents: torch.Tensor  # [S, C, F, H, W] x_0 estimate after N steps
    counters: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.steps.shape[0]
