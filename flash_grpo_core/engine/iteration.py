"""One Flash-GRPO iteration in the core: prompts -> rollouts -> videos -> rewards -> advantages -> update.

`Engine` holds what lives across iterations (models, policy, optimizer, EMA, schedule tables);
the stages of the pipeline call its pieces separately (`plan_steps`, `generate`, `score`,
`advantages_for`, `update`), and `run_iteration` chains them for the single-process main job and
the benchmarks. Every random draw derives from `params.seed` and the iteration number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from flash_grpo_core.config import ConfigError, Params
from flash_grpo_core.engine.distributed import current as current_world
from flash_grpo_core.engine.ema import EMA
from flash_grpo_core.engine.fast_rollout import FastRolloutOptions, fast_rollout
from flash_grpo_core.engine.sampler import RolloutInputs, SamplingSpec, rollout
from flash_grpo_core.engine.seeding import derive_seed
from flash_grpo_core.engine.trainer import Policy, StepContext, make_optimizer, update_policy
from flash_grpo_core.method.advantages import group_advantages
from flash_grpo_core.method.batch import PassCounter, RolloutBatch
from flash_grpo_core.method.rectify import rectification_factors
from flash_grpo_core.method.schedule import flow_sigmas
from flash_grpo_core.method.sde import noise_scales
from flash_grpo_core.method.modes import get_mode


def resolve_device(name: str) -> torch.device:
    """The configured device; a plain `cuda` (or `auto` with CUDA) is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {name!r} but this machine has no CUDA device (set model.device: auto "
                          "or cpu)")
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # init_from_env pinned the rank's GPU
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_stack(params: Params, dtype: torch.dtype, text_encoder: bool = True):
    """The preset's Wan stack: a seeded tiny random model, the model of the task the preset trains
    (config/tasks.py; the toy's pixel-space model), or Wan 2.1 from `model.path`. Without
    `text_encoder` the stack has none (Wan 2.1 skips loading it; the models built in code drop
    theirs, their transformer unchanged): for callers that get the prompt embeddings the rollout stored."""
    from flash_grpo_core.config.tasks import load_target, task_for_preset
    from flash_grpo_core.models import random_stacks, wan

    task = None if params.is_tiny else task_for_preset(params.preset)
    if params.is_tiny:
        stack = random_stacks.build_tiny_stack(seed=params.seed, dtype=dtype, text_len=params.model.text_len)
    elif task is not None and task.model is not None:
        stack = load_target(task.model)(params, dtype)
    else:
        return wan.load_stack(params.model.path, dtype=dtype, max_text_len=params.model.text_len,
                                 text_encoder=text_encoder)
    if not text_encoder:
        stack.text_encoder = None
    return stack


def make_trainable(transformer: torch.nn.Module, params: Params) -> torch.nn.Module | None:
    """Attach LoRA or unfreeze every weight (before moving to the device, so LoRA's seeded CPU init
    is the same on every machine). Returns the frozen reference for a KL term under full
    fine-tuning, else None (under LoRA the reference is the model with its adapter disabled)."""
    import copy

    from flash_grpo_core.models import lora

    if params.model.finetune == "lora":
        lora.apply_lora(transformer, rank=params.model.lora_rank, alpha=params.model.lora_alpha,
                        target_modules=params.model.lora_targets, seed=derive_seed(params.seed, "lora") % 2**32,
                        init=params.model.lora_init, compute=params.model.lora_compute)
        return None
    reference = copy.deepcopy(transformer).requires_grad_(False) if params.train.kl_beta > 0 else None
    lora.enable_full_finetune(transformer)
    return reference


def build_policy(transformer: torch.nn.Module, params: Params, reference: torch.nn.Module | None = None) -> Policy:
    """Optimizer and EMA over the transformer's trainable weights (already on their device)."""
    from flash_grpo_core.models.lora import trainable_parameters

    if params.model.gradient_checkpointing:
        from flash_grpo_core.models.wan import enable_checkpointing

        enable_checkpointing(transformer, params.model.checkpoint_every)
    parameters = trainable_parameters(transformer)
    ema = EMA(parameters, decay=params.train.ema_decay, every=params.train.ema_every)
    return Policy(transformer, parameters, make_optimizer(parameters, params.train), ema, reference)


@dataclass
class Engine:
    params: Params
    stack: object  # models.WanStack
    policy: Policy
    device: torch.device
    sigmas: torch.Tensor = field(init=False)  # [N + 1]
    scales: torch.Tensor = field(init=False)  # [N]
    step_factors: torch.Tensor = field(init=False)  # [N]

    def __post_init__(self):
        r = self.params.rollout
        self.sigmas = flow_sigmas(r.num_steps, r.shift, r.schedule)
        self.scales = noise_scales(self.sigmas, r.noise, r.noise_level)
        self.step_factors = rectification_factors(self.sigmas, self.params.train.rectify, r.noise, r.noise_level)

    @property
    def guided(self) -> bool:
        return self.params.rollout.guidance != 1.0


def build_engine(params: Params, text_encoder: bool = True) -> Engine:
    """The preset's engine; `text_encoder=False` for stages that never encode a prompt."""
    device = resolve_device(params.model.device)
    stack = build_stack(params, resolve_dtype(params.model.dtype, device), text_encoder)
    check_video_size(stack, params)
    reference = make_trainable(stack.transformer, params)
    frozen = () if params.model.offload_frozen else (stack.text_encoder, stack.vae)  # else: moved per use
    for module in (stack.transformer, reference, *frozen):
        if module is not None:
            module.to(device)
    return Engine(params, stack, build_policy(stack.transformer, params, reference), device)


@contextlib.contextmanager
def visiting(engine: Engine, module: torch.nn.Module | None) -> Iterator[None]:
    """With model.offload_frozen, `module` (the UMT5 encoder or the VAE) moves to the engine's device
    for the block and back to host memory after it; otherwise it stays where it is."""
    if module is None or not engine.params.model.offload_frozen:
        yield
        return
    module.to(engine.device)
    try:
        yield
    finally:
        module.to("cpu")
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()  # give its blocks back for the transformer's activations


def check_video_size(stack, params: Params) -> None:
    """The rollout's video must fit the transformer's position table (`rope_max_seq_len` patches per
    axis): a larger one fails in the first forward pass with a shape error. Checked when the model is
    built, before any sampling."""
    r = params.rollout
    config = stack.transformer.config
    grid = stack.latent_shape(r.frames, r.height, r.width)[1:]  # (F, H, W) of the latent
    names = ("rollout.frames", "rollout.height", "rollout.width")
    for name, value, size, patch in zip(names, (r.frames, r.height, r.width), grid, config.patch_size):
        _check_fits(name, value, size, patch, config.rope_max_seq_len)


def _check_fits(name: str, value: int, size: int, patch: int, limit: int) -> None:
    if size % patch:
        raise ConfigError(f"{name} {value} gives {size} latent positions, not a multiple of the model's patch "
                          f"size {patch} on that axis")
    if size // patch > limit:
        raise ConfigError(f"{name} {value} gives {size // patch} patches, more than the {limit} positions the "
                          f"model's rope_max_seq_len allows on that axis")


def iteration_prompts(items: list, count: int, iteration: int, seed: int) -> list:
    """The `count` items (prompts) of `iteration` (1-based in the pipeline; any int works).

    Walks through seeded permutations of the items, one permutation per epoch, so every prompt is
    used once per epoch and the choice depends only on (seed, iteration, the item list).
    """
    if not items:
        raise ValueError("no prompts to choose from")
    chosen, position = [], iteration * count
    while len(chosen) < count:
        epoch, offset = divmod(position, len(items))
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
        take = min(count - len(chosen), len(items) - offset)
        chosen += [items[i] for i in order[offset:offset + take].tolist()]
        position += take
    return chosen


def plan_steps(params: Params, num_prompts: int, iteration: int) -> torch.Tensor:
    """Trained steps [B, G, T] of `iteration` for the configured mode (`method/modes`)."""
    generator = torch.Generator().manual_seed(derive_seed(params.seed, iteration, "steps"))
    return get_mode(params.train.mode).plan(params.rollout, params.train, num_prompts, iteration, generator)


def plan_stochastic_steps(params: Params, train_steps: torch.Tensor) -> torch.Tensor:
    """Where the rollout takes SDE steps, BoolTensor [B, G, N]: every step in `full` (Flow-GRPO
    samples the whole trajectory with the SDE and trains its first steps), else the trained steps."""
    return get_mode(params.train.mode).stochastic(train_steps, params.rollout.num_steps)


def encode(engine: Engine, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings [B, L, D] and, with guidance, the negative prompt's [1, L, D]."""
    from flash_grpo_core.models.wan import encode_prompts

    with visiting(engine, engine.stack.text_encoder):
        cond = encode_prompts(engine.stack, prompts, engine.device)
        uncond = encode_prompts(engine.stack, [engine.params.rollout.negative_prompt], engine.device) \
            if engine.guided else None
    return cond, uncond


def generate(engine: Engine, prompts: list[str], iteration: int, counter: PassCounter,
             train_steps: torch.Tensor | None = None, progress=None,
             embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None,
             groups: range | None = None) -> tuple[RolloutBatch, torch.Tensor]:
    """Rollouts of one iteration and their decoded videos uint8 [S, F, H, W, 3]; `embeds`: the
    prompts' `encode` output when the caller already has it; `groups`: the prompts whose whole
    groups to sample (default all), as one rank's share: the batch's `prompt_index` still indexes
    `prompts`, and each sample draws the noise it would draw in a rollout of every prompt."""
    batch = sample_rollouts(engine, prompts, iteration, counter, train_steps, progress, embeds, groups)
    return batch, decode(engine, batch.final_latents)


def sample_rollouts(engine: Engine, prompts: list[str], iteration: int, counter: PassCounter,
                    train_steps: torch.Tensor | None = None, progress=None,
                    embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                    groups: range | None = None) -> RolloutBatch:
    """`generate` without decoding: the rollouts' latents. With a cheaper-rollout option on
    (`rollout.head_steps`, `tail_steps`, `guidance_until`), `engine/fast_rollout.py` samples."""
    r = engine.params.rollout
    if train_steps is None:
        train_steps = plan_steps(engine.params, len(prompts), iteration)  # [B, G, T]
    cond, uncond = embeds if embeds is not None else encode(engine, prompts)
    groups = range(len(prompts)) if groups is None else groups
    mine = train_steps[groups.start:groups.stop]  # [b, G, T]
    if get_mode(engine.params.train.mode).forward_process:  # ODE throughout, only the final latents kept
        mine = mine[..., :0]
    fast = FastRolloutOptions.from_config(r)  # rollout.head_steps, tail_steps, guidance_until
    sample = partial(fast_rollout, options=fast) if fast.active else rollout
    spec = sampling_spec(engine, engine.sigmas, engine.scales, r.guidance,
                         derive_seed(engine.params.seed, iteration, "noise"), same_initial=r.same_initial_noise)
    inputs = RolloutInputs(cond[groups.start:groups.stop], uncond, mine, plan_stochastic_steps(engine.params, mine),
                           first_sample=groups.start * r.group_size)
    batch = sample(engine.policy.transformer, inputs, spec, counter, progress)
    batch.prompt_index += groups.start
    return batch


def decode(engine: Engine, latents: torch.Tensor) -> torch.Tensor:
    """Videos uint8 [S, F, H, W, 3] from final latents [S, C, F, H, W], decoded in sampling batches."""
    from flash_grpo_core.models.wan import decode_latents

    with visiting(engine, engine.stack.vae):
        return torch.cat([decode_latents(engine.stack, chunk.to(engine.device))
                          for chunk in latents.split(engine.params.rollout.batch_size)])


def sample_ode(engine: Engine, prompts: list[str], num_steps: int, guidance: float, seed: int,
               groups: range | None = None,
               embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """Deterministic (ODE) samples, one per prompt, for evaluation: videos uint8 [B, F, H, W, 3].

    Prompt i's noise comes from (seed, i), so checkpoints are compared on the same noise; `groups`
    picks the prompts to sample (default all) without changing any prompt's noise, and `embeds` is
    `encode(engine, prompts)` when the caller has it.
    """
    r = engine.params.rollout
    sigmas = flow_sigmas(num_steps, r.shift, r.schedule)
    groups = range(len(prompts)) if groups is None else groups
    no_sde = torch.zeros(len(groups), 1, 0, dtype=torch.long)  # [B, G=1, T=0]: no stochastic step
    cond, uncond = embeds if embeds is not None else encode(engine, prompts)
    spec = sampling_spec(engine, sigmas, torch.zeros(num_steps), guidance, seed)
    inputs = RolloutInputs(cond[groups.start:groups.stop], uncond if guidance != 1.0 else None, no_sde,
                           first_sample=groups.start)
    batch = rollout(engine.policy.transformer, inputs, spec)
    return decode(engine, batch.final_latents)


def sampling_spec(engine: Engine, sigmas: torch.Tensor, scales: torch.Tensor, guidance: float, seed: int,
                  same_initial: bool = False) -> SamplingSpec:
    """The sampler's settings for `engine`'s video size, sampling batch and CFG order."""
    r = engine.params.rollout
    return SamplingSpec(sigmas, scales, guidance, engine.stack.latent_shape(r.frames, r.height, r.width), seed,
                        r.batch_size, engine.params.model.cfg_sequential, same_initial)


def reward_from_params(params: Params, scale_guard: bool = False):
    """The configured weighted reward; `reward.frame_stride` applies to every component. With
    `scale_guard`, each component's batch mean is checked against its history (see ScaleGuard)."""
    from flash_grpo_core.rewards import build_weighted_reward, check_reward_params

    check_reward_params(params.reward)  # a task's reward (a plugin) is loaded here when named
    options = {name: {"frame_stride": params.reward.frame_stride, **params.reward.options.get(name, {})}
               for name in params.reward.weights}
    return build_weighted_reward(dict(params.reward.weights), options, scale_guard=scale_guard)


def score(reward_fn, videos: torch.Tensor, prompts: list[str], batch: RolloutBatch):
    """Reward of every sample (S = B * G) via the reward protocol; returns (scores [S], info)."""
    sample_prompts = [prompts[i] for i in batch.prompt_index.tolist()]
    metadata = [{"prompt_index": int(p), "steps": s.tolist()} for p, s in zip(batch.prompt_index, batch.steps)]
    output = reward_fn(videos, sample_prompts, metadata)
    return output.scores, output.info


def advantages_for(params: Params, rewards: torch.Tensor) -> torch.Tensor:
    """Advantages [S] from rewards [S] laid out prompt-major (s = b * G + g)."""
    grouped = rewards.reshape(-1, params.rollout.group_size)  # [B, G]
    return group_advantages(grouped, params.train.std_scope, params.train.adv_clip).reshape(-1)


def update(engine: Engine, prompts: list[str], batch: RolloutBatch, advantages: torch.Tensor, iteration: int,
           counter: PassCounter, progress=None,
           embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, float]:
    """The GRPO update on one iteration's rollouts; `embeds` as in `generate` (the update stage
    passes the rollout's stored ones, so it needs no text encoder)."""
    cond, uncond = embeds if embeds is not None else encode(engine, prompts)
    mode = get_mode(engine.params.train.mode)
    if mode.forward_process:  # the levels each final sample is re-noised at: the plan's, on every rank alike
        levels = plan_steps(engine.params, len(prompts), iteration).reshape(batch.num_samples, -1)
        batch = replace(batch, steps=levels)
    ctx = StepContext(batch, advantages, cond, uncond, engine.sigmas.to(engine.device),
                      engine.scales.float().to(engine.device), engine.params.rollout.guidance,
                      cfg_sequential=engine.params.model.cfg_sequential, objective=mode.objective,
                      noise_seed=derive_seed(engine.params.seed, iteration, "forward-noise"))
    generator = torch.Generator().manual_seed(derive_seed(engine.params.seed, iteration, "minibatches"))
    if current_world().distributed and engine.policy.parallel is None:
        from flash_grpo_core.engine.parallel import data_parallel
        from flash_grpo_core.engine.sampler import compute_dtype

        strategy = engine.params.train.parallel
        if strategy == "auto":
            strategy = "ddp" if engine.params.model.finetune == "lora" else "fsdp"
        if strategy == "fsdp" and mode.forward_process:  # the sampling policy's copy is called unsharded
            raise ConfigError(f"train.mode {mode.name} trains on several ranks with DDP only (train.parallel: ddp, "
                              f"or model.finetune: lora); FSDP shards the weights its sampling policy is called with")
        engine.policy.parallel = data_parallel(engine.policy, engine.device, strategy,
                                               compute_dtype(engine.policy.transformer),
                                               lambda parameters: make_optimizer(parameters, engine.params.train))
    if mode.forward_process:  # the weights that sampled the rollouts, before this update moves them
        ctx.sampling_weights = {name: param.detach().clone() for name, param in engine.policy.parameters.items()}
    engine.policy.transformer.train()
    try:
        return update_policy(engine.policy, ctx, engine.step_factors, engine.params.train, generator, counter,
                             progress)
    finally:
        engine.policy.transformer.eval()


def run_iteration(engine: Engine, prompts: list[str], reward_fn, iteration: int) -> dict[str, float]:
    """Rollout, score and update once; metrics include reward statistics and pass counts."""
    rollout_counter, train_counter = PassCounter(), PassCounter()
    embeds = encode(engine, prompts)
    batch, videos = generate(engine, prompts, iteration, rollout_counter, embeds=embeds)
    rewards, _ = score(reward_fn, videos, prompts, batch)
    advantages = advantages_for(engine.params, rewards)
    metrics = update(engine, prompts, batch, advantages, iteration, train_counter, embeds=embeds)
    return {
        "iteration": iteration, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
        **metrics,
        "rollout_forward_passes": rollout_counter.forward,
        "train_forward_passes": train_counter.forward, "train_backward_passes": train_counter.backward,
    }
