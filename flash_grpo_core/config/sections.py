"""The sections of `params.yaml` as frozen dataclasses, each checking its own values, and `Params`,
which holds them and checks combinations across sections, saying what to change. Loading (YAML,
presets, overrides, types) is `loading.py`. No torch here, so flows and CLIs validate cheaply."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from flash_grpo_core.config.choices import (
    DEFAULT_LORA_TARGETS,
    FINETUNE_KINDS,
    LORA_COMPUTES,
    LORA_INITS,
    OPTIMIZER_STATES,
    PARALLEL_STRATEGIES,
    PRESETS,
)
from flash_grpo_core.method.choices import NOISE_KINDS, RECTIFY_MODES, SCHEDULE_KINDS, STD_SCOPES
from flash_grpo_core.method.modes import get_mode, mode_names
from flash_grpo_core.config.checks import (  # noqa: F401 - ConfigError re-exported
    ConfigError,
    _check,
    _check_path,
    _check_positive,
    _check_seed,
)
from flash_grpo_core.config.building import build_section
from flash_grpo_core.config.dvc_layout import dvc_loop, eval_points
from flash_grpo_core.config.monitoring import HealthConfig, TrackingConfig
from flash_grpo_core.config.plugins import load_plugins


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # local Diffusers-format Wan 2.1 T2V folder (wan presets)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda when available
    finetune: str = "lora"  # lora | full
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # module-name suffixes peft adapts
    lora_init: str = "gaussian"  # gaussian | default (peft's kaiming-uniform A)
    lora_compute: str = "input"  # input: fp32 adapters multiply in the base's dtype | float32 (peft's casts)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1  # with it: recompute every n-th block only, the others keep their activations
    cfg_sequential: bool = False  # CFG halves one after the other instead of one batch (less memory)
    offload_frozen: bool = False  # UMT5 and VAE wait in host memory, on the device only to encode/decode
    text_len: int = 512

    def __post_init__(self):
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"model.dtype: unknown {self.dtype!r}")
        for key, choices in (("finetune", FINETUNE_KINDS), ("lora_init", LORA_INITS), ("lora_compute", LORA_COMPUTES)):
            _check(getattr(self, key) in choices, f"model.{key} must be one of {choices}, got {getattr(self, key)!r}")
        _check(self.lora_rank > 0 and self.lora_alpha > 0, f"model.lora_rank and model.lora_alpha must be > 0, got {self.lora_rank} and {self.lora_alpha}")
        _check(all(t.strip() for t in self.lora_targets or [""]), "model.lora_targets must list module-name suffixes")
        _check(self.text_len > 0 and self.checkpoint_every > 0, f"model.text_len and model.checkpoint_every must be > 0, got {self.text_len} and {self.checkpoint_every}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None,
               f"model.device must be auto, cpu, cuda or cuda:<index>, got {self.device!r}")


@dataclass(frozen=True)
class RolloutConfig:
    num_steps: int = 20  # N
    shift: float = 3.0
    schedule: str = "authors"  # authors | diffusers
    num_candidates: int = 10  # K: flash draws its step from the first K
    iso_temporal: bool = True
    # a prompt's group starts from one initial noise (MixGRPO's and DanceGRPO's --init_same_noise), so
    # its samples differ only by their SDE noise; false: each sample its own (the Flash-GRPO authors')
    same_initial_noise: bool = False
    noise: str = "wan"  # wan | flow_grpo | dance
    noise_level: float | None = None  # None: the noise kind's default
    guidance: float = 4.5  # classifier-free guidance scale; 1.0 disables CFG
    negative_prompt: str = ""
    height: int = 480
    width: int = 832
    frames: int = 81
    prompts_per_iteration: int = 8  # B (global)
    group_size: int = 8  # G
    batch_size: int = 8  # samples per transformer call while sampling
    # Cheaper flash rollouts (engine/fast_rollout.py); null: off, Euler on the training grid, guided everywhere.
    head_steps: int | None = None  # UniPC steps from sigma_0 to the SDE step's sigma_k
    tail_steps: int | None = None  # UniPC steps from sigma_{k+1} to 0
    guidance_until: float | None = None  # after the SDE step, steps that start below this sigma skip CFG

    @property
    def cheaper(self) -> bool:
        """Whether any cheaper-rollout option is on."""
        return (self.head_steps, self.tail_steps, self.guidance_until) != (None, None, None)

    def __post_init__(self):
        _check(self.num_steps >= 1, "rollout.num_steps must be >= 1")
        _check(1 <= self.num_candidates <= self.num_steps,
               f"rollout.num_candidates (K={self.num_candidates}) must be between 1 and num_steps (N={self.num_steps})")
        _check(self.schedule in SCHEDULE_KINDS, f"rollout.schedule must be one of {SCHEDULE_KINDS}")
        _check(self.noise in NOISE_KINDS, f"rollout.noise must be one of {NOISE_KINDS}")
        _check(self.shift > 0, "rollout.shift must be > 0")
        _check(math.isfinite(self.guidance) and self.guidance >= 1.0,
               "rollout.guidance must be >= 1 (1 disables classifier-free guidance)")
        _check(self.noise_level is None or (math.isfinite(self.noise_level) and self.noise_level > 0),
               f"rollout.noise_level must be null (the noise kind's default) or > 0, got {self.noise_level!r}")
        _check(self.height > 0 and self.width > 0 and self.frames > 0,
               f"rollout.height, rollout.width and rollout.frames must be > 0, got {self.height}x{self.width}x{self.frames}")
        _check(self.prompts_per_iteration >= 1 and self.group_size >= 2,
               "rollout.prompts_per_iteration must be >= 1 and rollout.group_size >= 2 (advantages need a group)")
        _check(self.batch_size >= 1, "rollout.batch_size must be >= 1")
        # at most k head steps (k <= K - 1) and N - k - 1 tail steps: a larger count changes nothing
        for key, most in (("head_steps", self.num_candidates - 1), ("tail_steps", self.num_steps - 1)):
            value = getattr(self, key)
            _check(value is None or 1 <= value <= max(most, 1),
                   f"rollout.{key} must be between 1 and {max(most, 1)} solver steps, or null (off), got {value}")
        _check(self.guidance_until is None or 0 < self.guidance_until <= 1,
               f"rollout.guidance_until must be a sigma in (0, 1], or null (guidance everywhere), "
               f"got {self.guidance_until}")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "flash"  # flash | window | window_k | full | nft | awm (method/modes/)
    rectify: str = "exact"  # exact | none | flow_grpo
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    clip_range: float = 1e-3
    adv_clip: float = 5.0
    std_scope: str = "batch"  # batch | group
    kl_beta: float = 0.0
    minibatches: int = 1  # optimizer steps per iteration; later ones are slightly off-policy
    micro_batch: int = 2  # trained items per forward/backward
    skip_zero_advantage: bool = True
    ema_decay: float = 0.9
    ema_every: int = 8  # optimizer steps between EMA updates
    timestep_fraction: float = 1.0  # full mode: the first int(fraction * N) steps are trained (Flow-GRPO)
    window_size: int = 4  # window modes: W (MixGRPO's `group_size`)
    window_stride: int = 1  # steps the window moves by (MixGRPO's `prog_overlap_step`)
    window_every: int = 25  # iterations between window moves (MixGRPO's `iters_per_group`)
    nft_beta: float = 1.0  # nft: the implicit policies' step b (DiffusionNFT's `config.beta`); checked by the mode
    awm_weighting: str = "uniform"  # awm: the flow-matching surrogate's weight over t: uniform | t | t**2
    parallel: str = "auto"  # on several ranks: ddp | fsdp | auto (ddp for LoRA, fsdp for full fine-tuning)
    # AdamW's moments: in the checkpoint (a DVC output) or beside it for the latest keep_optimizer_states iterations
    optimizer_state: str = "checkpoint"
    keep_optimizer_states: int = 2

    def __post_init__(self):
        _check(self.parallel in PARALLEL_STRATEGIES,
               f"train.parallel must be one of {PARALLEL_STRATEGIES}, got {self.parallel!r}")
        if self.mode not in mode_names():  # a plugin's mode (config/plugins.py) registers when imported
            load_plugins()
        _check(self.mode in mode_names(), f"train.mode must be one of {mode_names()}, got {self.mode!r}")
        _check(self.rectify in RECTIFY_MODES, f"train.rectify must be one of {RECTIFY_MODES}, got {self.rectify!r}")
        _check(self.std_scope in STD_SCOPES, f"train.std_scope must be one of {STD_SCOPES}, got {self.std_scope!r}")
        _check(self.learning_rate > 0, "train.learning_rate must be > 0")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas must be two numbers in [0, 1)")
        _check(self.clip_range > 0 and self.adv_clip > 0 and self.grad_clip > 0,
               "train.clip_range, train.adv_clip and train.grad_clip must be > 0")
        _check(self.kl_beta >= 0, "train.kl_beta must be >= 0")
        _check(0 <= self.ema_decay < 1 and self.ema_every >= 1, "train.ema_decay must be in [0, 1) and train.ema_every >= 1")
        _check(0 < self.timestep_fraction <= 1, "train.timestep_fraction must be in (0, 1]")
        _check(self.optimizer_state in OPTIMIZER_STATES,
               f"train.optimizer_state must be one of {OPTIMIZER_STATES}, got {self.optimizer_state!r}")
        _check_positive("train", self, ("minibatches", "micro_batch", "window_size", "window_stride", "window_every",
                                        "keep_optimizer_states"))


@dataclass(frozen=True)
class RewardConfig:
    """That the names are registered rewards with their required options is checked against the
    reward registry (`rewards.check_reward_params`): by the validate stage, and whenever one is built."""

    weights: dict[str, float] = field(default_factory=lambda: {"brightness": 1.0})
    options: dict[str, dict] = field(default_factory=dict)  # per-reward keyword arguments
    frame_stride: int = 1

    def __post_init__(self):
        _check(len(self.weights) > 0, "reward.weights must name at least one reward")
        for name, weight in self.weights.items():
            _check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight),
                   f"reward.weights.{name} must be a finite number, got {weight!r}")
        _check(all(name in self.weights for name in self.options),
               f"reward.options names rewards not in reward.weights: {sorted(set(self.options) - set(self.weights))}")
        _check(self.frame_stride >= 1, "reward.frame_stride must be >= 1")

    def check_known(self, known: dict[str, tuple[tuple[str, ...], str]]) -> None:
        """ConfigError unless every weighted reward is in `known` ({name: (required options, hint)}:
        the reward registry's, or the declarations the validate stage reads without importing them)
        with its required options set."""
        unknown = sorted(set(self.weights) - set(known))
        _check(not unknown, f"reward.weights names unknown reward(s) {unknown}; known: {', '.join(sorted(known))}")
        for name in self.weights:
            keys, hint = known[name]
            for key in keys:
                _check(bool((self.options.get(name) or {}).get(key)),
                       f"reward {name} needs reward.options.{name}.{key} in params.yaml ({hint})")


@dataclass(frozen=True)
class EvalConfig:
    num_steps: int = 50
    guidance: float = 4.5
    seed: int = 1234
    num_prompts: int = 8
    use_ema: bool = True
    report_samples: int = 4  # prompts shown as base | trained videos in the report
    # Samples per held-out prompt, each from its own fixed noise: the paired base/trained differences
    # over them give the evaluation's interval on the reward delta.
    samples_per_prompt: int = 1
    fps: int = 16  # frame rate of the report's videos (Wan 2.1: 16)
    # VBench-style dimensions (flash_grpo_core/metrics): options per dimension, e.g.
    # subject_consistency: {path: models/dino-vitb16}; weight-free ones always run.
    metrics: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        _check(self.num_steps >= 1 and self.num_prompts >= 1, "eval.num_steps and eval.num_prompts must be >= 1")
        _check(self.report_samples >= 0 and self.fps >= 1, "eval.report_samples must be >= 0 and eval.fps >= 1")
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt must be >= 1")
        _check_seed("eval.seed", self.seed)
        _check(math.isfinite(self.guidance) and self.guidance >= 1.0,
               f"eval.guidance must be >= 1 (1 disables classifier-free guidance), got {self.guidance!r}")


@dataclass(frozen=True)
class ExportConfig:
    """The `export` stage: the last checkpoint's weights as diffusers loads them (stages/export.py).
    No iteration key: dvc.yaml names the exported checkpoint's path, and DVC can only spell it from
    `iterations` (the last); another checkpoint is one `python -m stages.export` command away."""

    use_ema: bool = True  # the EMA weights (what the evaluation samples with), else the raw trained ones


@dataclass(frozen=True)
class DataConfig:
    """What `curate` keeps and how it splits (see flash_grpo_core/artifacts/prompts.py)."""

    min_words: int = 2
    max_words: int = 120
    eval_fraction: float = 0.1
    min_eval: int = 2
    semantic_threshold: float | None = 0.95  # cosine; null disables semantic dedupe
    seed: int = 0  # salts the split hash
    source: str = "prompts/example.txt"  # what curate reads: a .txt/.jsonl/.parquet file or a train.txt/test.txt folder

    def __post_init__(self):
        _check_path("data.source", self.source)
        _check_seed("data.seed", self.seed)
        _check(self.min_words >= 0, f"data.min_words must be >= 0, got {self.min_words}")
        _check(self.max_words >= self.min_words,
               f"data.max_words ({self.max_words}) must be >= data.min_words ({self.min_words})")
        _check(0.0 <= self.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _check(self.min_eval >= 0, f"data.min_eval must be >= 0, got {self.min_eval}")
        _check(self.semantic_threshold is None or 0.0 < self.semantic_threshold <= 1.0,
               f"data.semantic_threshold must be in (0, 1] or null, got {self.semantic_threshold}")

    @classmethod
    def from_mapping(cls, mapping: dict | None, section: str = "data") -> DataConfig:
        """Build from a parsed params section, rejecting unknown keys and wrong types by key path."""
        return build_section(cls, dict(mapping or {}), section)


@dataclass(frozen=True)
class PipelineConfig:
    """Layout of the staged pipeline's artifacts (dvc.yaml reads these keys too)."""

    root: str = "runs"  # artifacts go to <root>/<preset>/...
    groups_per_shard: int = 1  # prompt groups per WebDataset shard
    # {iteration: previous iteration} for 1..N, for dvc.yaml's foreach (DVC cannot count), so stages
    # are named update@1, update@2, ... `python -m flash_grpo_core.pipeline.iterations N` sets it
    # with `iterations`.
    loop: dict[str, int] = field(default_factory=dict)
    # Checkpoints the `eval_checkpoint` stage evaluates: the base (0), every `eval_every`-th
    # iteration (0: none between) and the last, for metrics over iterations (`dvc plots`).
    # `eval_at` spells them out for dvc.yaml's foreach; `python -m flash_grpo_core.pipeline.iterations N`
    # sets it.
    eval_every: int = 0
    eval_at: tuple[int, ...] = ()
    # Keep every n-th iteration's checkpoint and the latest; `python -m flash_grpo_core.pipeline.prune`
    # (and the train-loop flow after each update) removes the others. 0: keep all. Read by no stage.
    keep_checkpoints_every: int = 0

    def __post_init__(self):
        _check(self.groups_per_shard >= 1, "pipeline.groups_per_shard must be >= 1")
        _check(self.keep_checkpoints_every >= 0,
               f"pipeline.keep_checkpoints_every must be >= 0, got {self.keep_checkpoints_every}")
        _check_path("pipeline.root", self.root)
        _check(self.eval_every >= 0, f"pipeline.eval_every must be >= 0, got {self.eval_every}")


@dataclass(frozen=True)
class ToyConfig:
    """The alignment benchmark's synthetic task and pixel-space model (see flash_grpo_core/tasks/toy/)."""

    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
    directions: tuple[str, ...] = ("left", "right", "up", "down")
    held_out: tuple[str, ...] = ("red up", "green left", "blue down", "yellow right", "magenta up", "cyan left")
    rl_only: tuple[str, ...] = ()  # train combinations kept out of pre-training: GRPO's reward alone teaches them
    frames: int = 8
    size: int = 16  # frames are size x size pixels
    square: int = 4  # side of the square, pixels
    speed: int = 1  # pixels per frame
    data_speeds: tuple[int, ...] = ()  # pre-training clips' speeds, one drawn per clip (empty: `speed` alone)
    data_squares: tuple[int, ...] = ()  # pre-training clips' square sides, one drawn per clip (empty: `square`)
    seed: int = 0  # the base model's (and text encoder's) initialisation
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    ffn_dim: int = 256
    patch: int = 4
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    pretrain_lr: float = 1.0e-3
    pretrain_shift: float = 3.0  # sample training sigmas towards high noise, where layout is decided
    uncond_prob: float = 0.1  # prompt dropout, for classifier-free guidance

    def __post_init__(self):
        _check(len(self.colors) >= 2 and len(self.directions) >= 2, "toy.colors and toy.directions need >= 2 entries")
        _check_positive("toy", self, ("frames", "size", "patch", "layers", "heads", "head_dim", "ffn_dim"))
        _check_seed("toy.seed", self.seed)
        _check(self.pretrain_shift > 0, f"toy.pretrain_shift must be > 0, got {self.pretrain_shift}")
        for key, combo in ((k, c) for k in ("held_out", "rl_only") for c in getattr(self, k)):
            _check(len(parts := combo.split()) == 2 and parts[0] in self.colors and parts[1] in self.directions,
                   f"toy.{key} entry {combo!r} must be '<colour> <direction>' from toy.colors and toy.directions")
        shared = sorted(set(self.rl_only) & set(self.held_out))
        _check(not shared, f"toy.rl_only and toy.held_out share {shared}: a combination is trained on or held out")
        _check(len(set(self.held_out) | set(self.rl_only)) < len(self.colors) * len(self.directions),
               "toy.held_out and toy.rl_only leave no combination to pre-train on")
        _check(self.size % self.patch == 0, f"toy.size ({self.size}) must be a multiple of toy.patch ({self.patch})")
        squares, speeds = (self.square, *self.data_squares), (self.speed, *self.data_speeds)
        _check(0 < min(squares) and max(squares) < self.size and min(speeds) >= 0,
               "toy.square and data_squares must be in (0, size), speed and data_speeds >= 0")
        _check(max(squares) + max(speeds) * (self.frames - 1) <= self.size,
               "toy.square + speed * (frames - 1) must fit in toy.size for each of data_squares and data_speeds")
        _check(self.pretrain_steps >= 0 and self.pretrain_batch >= 1 and self.pretrain_lr > 0,
               "toy.pretrain_steps >= 0, pretrain_batch >= 1 and pretrain_lr > 0 are required")
        _check(0 <= self.uncond_prob < 1, "toy.uncond_prob must be in [0, 1)")


@dataclass(frozen=True)
class Params:
    preset: str = "tiny"
    seed: int = 0
    iterations: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # read by no stage's dvc.yaml params

    def __post_init__(self):
        _check(self.preset in PRESETS, f"preset must be one of {PRESETS}, got {self.preset!r}")
        _check(self.iterations >= 1, "iterations must be >= 1")
        _check_seed("seed", self.seed)
        rollout, train = self.rollout, self.train
        samples = rollout.prompts_per_iteration * rollout.group_size
        _check(samples % train.minibatches == 0,
               f"train.minibatches ({train.minibatches}) must divide the {samples} samples of an iteration "
               f"(rollout.prompts_per_iteration x group_size)")
        mode = get_mode(train.mode)
        _check(not rollout.cheaper or mode.one_sde_step,
               f"rollout.head_steps, tail_steps and guidance_until apply to rollouts with one SDE step per "
               f"sample (train.mode flash) only; set them to null for train.mode {train.mode!r}")
        for problem in mode.problems(rollout, train):
            _check(False, problem)
        if self.pipeline.loop:
            _check(self.pipeline.loop == dvc_loop(self.iterations),
                   f"pipeline.loop must map iterations 1..{self.iterations} to their predecessors to match "
                   f"`iterations`; run `python -m flash_grpo_core.pipeline.iterations {self.iterations}` "
                   "to rewrite it")
            expected = eval_points(self.iterations, self.pipeline.eval_every)
            _check(self.pipeline.eval_at == expected,
                   f"pipeline.eval_at must be {list(expected)} for {self.iterations} iterations with "
                   f"pipeline.eval_every {self.pipeline.eval_every}, got {list(self.pipeline.eval_at)}; "
                   f"run `python -m flash_grpo_core.pipeline.iterations {self.iterations}` to rewrite it")
        if self.preset != "toy":  # the toy model works in pixel space, without Wan's VAE
            r = self.rollout
            _check((r.frames - 1) % 4 == 0, f"rollout.frames - 1 must be divisible by 4 (Wan's VAE), got {r.frames}")
            _check(r.height % 16 == 0 and r.width % 16 == 0,
                   f"rollout.height and rollout.width must be multiples of 16, got {r.height}x{r.width}")
        if self.uses_wan_weights:
            _check(bool(self.model.path),
                   f"preset {self.preset} loads Wan 2.1 weights: set presets.{self.preset}.model.path in params.yaml "
                   f"to a local Diffusers-format folder")

    @property
    def uses_wan_weights(self) -> bool:
        """Whether the preset loads Wan 2.1 from `model.path` (not the tiny random stack or the toy model)."""
        return self.preset not in ("tiny", "toy")

    @property
    def is_tiny(self) -> bool:
        return self.preset == "tiny"
