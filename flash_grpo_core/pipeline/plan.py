"""What a run will cost, from its params and the model's configuration alone (no torch, no weights):
the batch per rank, the transformer's size, peak memory per GPU, time per iteration and disk.
`flash_grpo_core/pipeline/preflight.py` prints these numbers before any GPU work.

Every figure is an estimate; docs/decisions.md ("Preflight") gives the models and their sources:
- parameters: counted from the diffusers `WanTransformer3DModel` layout (1.419 B and 14.288 B for
  Wan 2.1's configs, as the built models count);
- activations per CFG branch and trained item with per-block checkpointing: each block's input kept
  (tokens x width in bf16) plus one block's working set, (37 x width + 4.6 x ffn) x tokens x 2 B,
  the two coefficients fitted to the project's notes' single-branch LoRA peaks on an H200 (1.3B
  11.6 GiB, 14B 55.1 GiB, LoRA on attention and FFN through peft); the measured CFG pairs (20.4
  and 83.3 GiB) then come out within 1%. The pipeline's default LoRA (attention only, bf16 adapter
  products) needs less, so the estimate is an upper one;
- step times: bench/costs/gpu_step.py's GPU record of the architecture when there is one, else the
  notes' H200 measurements at 32,760 tokens, scaled linearly by tokens;
- the rollout's block without autograd: (8 x width + 2 x ffn) x tokens x 2 B per row, assumed from
  the block's structure (INFERENCE_WORK), not measured;
- disk: checkpoints at 16 B per trained parameter (float32 weights, EMA, AdamW's two moments),
  shards at two float32 latents per trained step plus the decoded uint8 video per sample
  (artifacts/records.py), each counted twice: the workspace copy and DVC's cache copy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from flash_grpo_core.models.layout import WAN_SHARED_CONFIG, WAN_TRANSFORMER_CONFIGS

GB, GIB = 1e9, 2**30
BLOCK_WORK = (37.0, 4.6)  # one block's working set per token: x width, x ffn width (bf16 tensors)
# Without autograd a block holds a few tensors at once: the float32 residual and its modulated norm
# (2 x 2 units of width), q, k, v and the attention output (4), the FFN hidden before and after its
# activation (2 x ffn). Assumed from the block's structure, not measured.
INFERENCE_WORK = (8.0, 2.0)
REFERENCE_TOKENS = 32_760  # 480x832x81: latents 16x21x60x104, patches 1x2x2
# Seconds at REFERENCE_TOKENS on an H200 (the project's notes: random weights, bf16): one forward,
# one forward+backward with per-block gradient checkpointing.
MEASURED_STEPS = {"wan1_3b": (0.61, 2.63), "wan14b": (3.2, 13.8)}
STEP_SOURCE = "the project's notes, H200, bf16, 32,760 tokens"
TEXT_ENCODER_BYTES, VAE_BYTES = 6.73e9 * 2, 127e6 * 4  # UMT5-XXL in bf16, Wan's VAE in float32


@dataclass(frozen=True)
class Arch:
    """A Wan transformer's shape: heads x head_dim wide, `ffn` FFN width, `layers` blocks."""

    heads: int
    head_dim: int
    ffn: int
    layers: int
    patch: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict) -> Arch:
        """From a diffusers transformer config (transformer/config.json), shared Wan values filling gaps."""
        merged = {**WAN_SHARED_CONFIG, **config}
        return cls(merged["num_attention_heads"], merged["attention_head_dim"], merged["ffn_dim"],
                   merged["num_layers"], tuple(merged["patch_size"]), merged["in_channels"],
                   merged["out_channels"], merged["text_dim"], merged["freq_dim"])

    def parameters(self) -> int:
        """Parameter count of the diffusers WanTransformer3DModel with this shape."""
        d, f, patch = self.width, self.ffn, math.prod(self.patch)
        attention = 4 * (d * d + d) + 2 * d  # q, k, v, out with biases; the q/k RMS norms
        block = 2 * attention + 2 * d + (d * f + f + f * d + d) + 6 * d  # cross-attn norm, FFN, modulation
        embed = self.in_channels * d * patch + d  # patch embedding
        embed += self.freq_dim * d + d + d * d + d + 6 * (d * d + d)  # time embedding and projection
        embed += self.text_dim * d + d + d * d + d  # text embedding
        head = d * self.out_channels * patch + self.out_channels * patch + 2 * d
        return self.layers * block + embed + head


# The LoRA targets the plan can size: suffix -> (modules per block, input width, output width).
def _target_shapes(arch: Arch) -> dict[str, tuple[int, int, int]]:
    d, f = arch.width, arch.ffn
    shapes = {name: (2, d, d) for name in ("to_q", "to_k", "to_v", "to_out.0")}  # self- and cross-attention
    shapes.update({"ffn.net.0.proj": (1, d, f), "net.0.proj": (1, d, f), "ffn.net.2": (1, f, d), "net.2": (1, f, d)})
    return shapes


def lora_parameters(arch: Arch, rank: int, targets: tuple[str, ...]) -> tuple[int, list[str]]:
    """Adapter parameters r x (in + out) per adapted layer, and the targets the plan cannot size."""
    shapes = _target_shapes(arch)
    count = sum(arch.layers * n * rank * (fan_in + fan_out)
                for n, fan_in, fan_out in (shapes[t] for t in targets if t in shapes))
    return count, [t for t in targets if t not in shapes]


def known_arch(preset: str) -> str | None:
    """The released Wan 2.1 configuration a preset's name refers to (wan1_3b_flowgrpo: wan1_3b)."""
    return next((name for name in WAN_TRANSFORMER_CONFIGS if preset.startswith(name)), None)


def model_arch(params, project: Path) -> tuple[Arch | None, str]:
    """The transformer's shape and where it came from: the model folder's transformer/config.json when
    present, else the released configuration the preset names; None for the CPU presets."""
    if not params.uses_wan_weights:
        return None, "a CPU-sized model built in code"
    config = Path(params.model.path) / "transformer" / "config.json"
    if (project / config).is_file():
        try:
            return Arch.from_config(json.loads((project / config).read_text())), f"from {config}"
        except (ValueError, KeyError, TypeError) as error:
            return None, f"{config} is not a Wan transformer config ({error!r})"
    name = known_arch(params.preset)
    if name is None:
        return None, f"no {config} and no released Wan 2.1 config named by preset {params.preset}"
    return Arch.from_config(WAN_TRANSFORMER_CONFIGS[name]), f"Wan 2.1 {name}'s released config: no {config}"


def latent_shape(rollout) -> tuple[int, int, int, int]:
    """[C, F, H, W] of one video's latents: Wan's VAE compresses time 4x (plus the first frame), space 8x."""
    return 16, (rollout.frames - 1) // 4 + 1, rollout.height // 8, rollout.width // 8


def tokens(arch: Arch, rollout) -> int:
    _, frames, height, width = latent_shape(rollout)
    return (frames // arch.patch[0]) * (height // arch.patch[1]) * (width // arch.patch[2])


def trained_steps(params) -> int:
    """Trained steps per sample (the mode's: flash 1, full int(N x timestep_fraction), windows at most W)."""
    from flash_grpo_core.method.modes import get_mode

    return get_mode(params.train.mode).trained_steps(params.rollout, params.train)


def _forward_process(params) -> bool:
    """Whether the mode re-noises final samples (`nft`, `awm`): unguided items, one latent a sample."""
    from flash_grpo_core.method.modes import get_mode

    return get_mode(params.train.mode).forward_process


def branches(params) -> int:
    """Transformer batch rows per prompt: 2 with classifier-free guidance (cond and uncond), else 1."""
    return 2 if params.rollout.guidance > 1.0 else 1


def _block_work(arch: Arch, n_tokens: int, per_token: tuple[float, float] = BLOCK_WORK) -> float:
    """Bytes of one block's working set for one row of `n_tokens` (training: forward or recompute)."""
    return (per_token[0] * arch.width + per_token[1] * arch.ffn) * n_tokens * 2


def activation_bytes(arch: Arch, n_tokens: int, model) -> float:
    """Activations of one row's forward+backward: with checkpointing every n-th block keeps only its
    input (tokens x width, bf16) and one block at a time is recomputed; the others keep everything."""
    work = _block_work(arch, n_tokens)
    if not model.gradient_checkpointing:
        return arch.layers * work
    recomputed = math.ceil(arch.layers / model.checkpoint_every)
    return recomputed * n_tokens * arch.width * 2 + (arch.layers - recomputed) * work + work


def parallel_strategy(params) -> str:
    """train.parallel resolved as the update resolves it: auto is ddp for LoRA, fsdp for full fine-tuning."""
    if params.train.parallel != "auto":
        return params.train.parallel
    return "fsdp" if params.model.finetune == "full" else "ddp"


def trained_parameters(params, arch: Arch) -> int:
    """The update's trainable parameters: every weight, or the LoRA adapters."""
    if params.model.finetune == "full":
        return arch.parameters()
    return lora_parameters(arch, params.model.lora_rank, params.model.lora_targets)[0]


def state_bytes(params, arch: Arch, world: int, on_gpu: bool) -> float:
    """Weights and training state per GPU: 20 B per trained parameter (float32 weights, gradients,
    AdamW's two moments, EMA), sharded under FSDP; a LoRA base in the compute dtype (FSDP: float32
    shards, docs/distributed.md)."""
    shards = world if parallel_strategy(params) == "fsdp" else 1
    trained = 20 * trained_parameters(params, arch) / shards
    if params.model.finetune == "full":
        return trained
    base_bytes = 4 if shards > 1 or not on_gpu or params.model.dtype == "float32" else 2
    return base_bytes * arch.parameters() / shards + trained


def memory_bytes(params, arch: Arch, world: int, on_gpu: bool = True) -> dict[str, float]:
    """Peak bytes per GPU of the rollout (weights, frozen UMT5 and VAE, one batch's block without
    autograd; the VAE decode's own memory not counted) and of the update (weights and state,
    micro_batch items' activations); `peak` is the larger."""
    n_tokens, rows = tokens(arch, params.rollout), branches(params)
    weight_bytes = (4 if not on_gpu or params.model.dtype == "float32" else 2) * arch.parameters()
    frozen = 0.0 if params.model.offload_frozen else TEXT_ENCODER_BYTES + VAE_BYTES
    rollout = weight_bytes + frozen + params.rollout.batch_size * rows * _block_work(arch, n_tokens, INFERENCE_WORK)
    update_rows = params.train.micro_batch * (1 if params.model.cfg_sequential else rows)
    update = state_bytes(params, arch, world, on_gpu) + update_rows * activation_bytes(arch, n_tokens, params.model)
    return {"rollout": rollout, "update": update, "peak": max(rollout, update)}


def recorded_steps(project: Path, name: str) -> tuple[float, float, int, str] | None:
    """(forward, forward+backward) seconds of one row at a record's tokens, from bench/costs/gpu_step.py's
    GPU record of architecture `name` (bench/results/gpu_step-<name>-cuda.json) when there is one."""
    path = project / "bench" / "results" / f"gpu_step-{name}-cuda.json"
    try:
        record = json.loads(path.read_text())
        rows = 2 if record["guidance"] > 1 else 1  # the raw update trains one CFG pair per item
        forward = record["rollout"]["raw_s_per_video"] / record["rollout"]["raw_forward_passes_per_video"]
        _, frames, height, width = record["latent_shape"]
        at = frames * (height // 2) * (width // 2)
        return forward, record["update"]["raw_s_per_item"] / rows, at, str(path.relative_to(project))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def step_seconds(arch: Arch, n_tokens: int, project: Path | None = None) -> tuple[float, float, str] | None:
    """(forward, forward+backward) seconds of one row scaled linearly by tokens from the measurement
    of this architecture (a GPU record under `project` first, else the notes'), and its source;
    None for an unmeasured architecture."""
    for name, config in WAN_TRANSFORMER_CONFIGS.items():
        if Arch.from_config(config) == arch:
            recorded = recorded_steps(project, name) if project is not None else None
            forward, backward, at, source = recorded or (*MEASURED_STEPS[name], REFERENCE_TOKENS, STEP_SOURCE)
            scale = n_tokens / at
            return forward * scale, backward * scale, f"{name}: {forward:.3g} s / {backward:.3g} s ({source})"
    return None


def iteration_seconds(params, arch: Arch, world: int, project: Path | None = None) -> tuple[float, float, str] | None:
    """(rollout, update) seconds of one iteration on `world` GPUs and the source of the step costs:
    N guided forwards per video (Euler rollouts), a guided forward+backward per trained item, a
    reference forward more per item with the KL term; decoding, rewards and I/O not counted."""
    steps = step_seconds(arch, tokens(arch, params.rollout), project)
    if steps is None:
        return None
    forward, backward, source = steps
    videos = params.rollout.prompts_per_iteration * params.rollout.group_size
    rows = branches(params)
    if _forward_process(params):  # unguided; the sampling policy's forward per item too
        update = videos * trained_steps(params) * (backward + forward * (1 + (params.train.kl_beta > 0)))
    else:
        update = videos * trained_steps(params) * rows * (backward + (forward if params.train.kl_beta > 0 else 0.0))
    return videos * params.rollout.num_steps * rows * forward / world, update / world, source


def shard_bytes(params) -> float:
    """One iteration's rollout shards: per sample two float32 latents per trained step (the final
    latent alone for the forward-process modes), and the decoded video (frames x height x width x 3 bytes)."""
    r = params.rollout
    latents = 1 if _forward_process(params) else trained_steps(params) * 2
    per_sample = latents * math.prod(latent_shape(r)) * 4 + r.frames * r.height * r.width * 3
    return r.prompts_per_iteration * r.group_size * per_sample


def kept_checkpoints(iterations: int, every: int) -> int:
    """Checkpoints a run keeps (it0 included): all, or every `every`-th and the latest (pipeline/prune.py)."""
    if every == 0:
        return iterations + 1
    return len({k for k in range(iterations + 1) if k % every == 0} | {iterations})


def disk_bytes(params, arch: Arch, iterations: int | None = None) -> dict[str, float]:
    """Disk one iteration adds and `iterations` more (default: the whole run) need (checkpoints kept
    by pipeline.keep_checkpoints_every, every iteration's shards), each DVC output twice (workspace
    and cache); moments stored `beside` are outside DVC and kept for keep_optimizer_states iterations."""
    trained = trained_parameters(params, arch)
    moments = 8.0 * trained if params.train.optimizer_state == "beside" else 0.0
    checkpoint = 16.0 * trained - moments
    shards = shard_bytes(params)
    iterations = params.iterations if iterations is None else iterations
    kept = kept_checkpoints(iterations, params.pipeline.keep_checkpoints_every)
    planned = 2 * (checkpoint * kept + shards * iterations)
    planned += moments * min(params.train.keep_optimizer_states, iterations)
    return {"checkpoint": checkpoint, "shards": shards, "iteration": 2 * (checkpoint + shards) + moments,
            "planned": planned, "iterations": iterations}
