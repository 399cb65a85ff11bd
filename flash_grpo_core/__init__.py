"""Flash-GRPO core: the method's math, the models, the engine that runs them, and the artifacts.

The package is grouped by role, lower layers never importing higher ones:

    choices, config, dvc_layout   names and the typed params.yaml (no torch)
    method/      the paper's math as pure functions on tensors (schedule, SDE step and
                 log-probability, rectification, step sets, advantages, loss, global reductions)
    models/      the Wan 2.1 stack, LoRA, the tiny random stacks, the code-built tokenizer
    artifacts/   the on-disk formats and their writers (prompts, shards, scores, checkpoints, ...)
    rewards/     the reward protocol, registry, rewards, reward server and client
    metrics/     VBench-style evaluation dimensions
    engine/      what runs the model: sampler, trainer, one iteration, EMA, seeding
    report, toy, run, workspace   the HTML report, the toy task, a single-process CLI, scratch copies
    preflight, plan   a run's checks before any GPU work and its sizes (no torch)

Public, stable API (SPEC section 8, docs/api.md): `flow_sigmas`, `sde_step`, `noise_scales` and
`rectification_coefficients`, importable from here or from `flash_grpo_core.method.schedule` and
`flash_grpo_core.method.sde`. They are loaded on first access, so that light modules (flows,
configuration) importing this package do not pay for torch.
"""

from __future__ import annotations

_PUBLIC = {
    "flow_sigmas": "flash_grpo_core.method.schedule",
    "sde_step": "flash_grpo_core.method.sde",
    "noise_scales": "flash_grpo_core.method.sde",
    "rectification_coefficients": "flash_grpo_core.method.sde",
}
__all__ = ["flow_sigmas", "noise_scales", "rectification_coefficients", "sde_step"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'flash_grpo_core' has no attribute {name!r}")
