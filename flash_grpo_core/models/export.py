"""Trained weights in the formats diffusers users load: a Wan LoRA file, or a transformer folder.

- LoRA: `pytorch_lora_weights.safetensors`, laid out as diffusers' LoRA training scripts save a Wan
  adapter. The keys are peft's state dict without the adapter name (what
  `peft.get_peft_model_state_dict` returns: `blocks.0.attn1.to_q.lora_A.weight`) prefixed with
  `transformer.` (`WanLoraLoaderMixin.save_lora_weights`); the adapter's `LoraConfig.to_dict()`
  travels as JSON under the safetensors metadata key `lora_adapter_metadata`, each key prefixed with
  `transformer.` (the scripts' `_collate_lora_metadata`). `WanPipeline.load_lora_weights(folder)`
  builds its `LoraConfig` from that metadata; without it diffusers would take alpha = rank, a scale
  of 1 instead of alpha / rank (2 for the authors' r 16, alpha 32).
- Full fine-tuning: a `WanTransformer3DModel.save_pretrained` folder (config.json and float32
  safetensors, like the Wan 2.1 Diffusers repositories), which `WanTransformer3DModel.from_pretrained`
  loads. The model is built on the meta device and takes the checkpoint's tensors as its
  parameters, so exporting holds no second copy of the weights.

Departures from diffusers' own writer: the LoRA file's metadata holds only `lora_adapter_metadata`,
not also `"format": "pt"` (safetensors writes several metadata keys in a random order, and the
export is byte-reproducible; diffusers' loader does not read the format key), and the config's
`target_modules` set is written sorted (diffusers writes `list(set)`, in hash order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig

from flash_grpo_core.artifacts.atomic import atomic_directory
from flash_grpo_core.artifacts.checkpoint import CheckpointError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
TRANSFORMER_FOLDER = "transformer"
INFO_NAME = "export.json"
PREFIX = "transformer"  # the pipeline component the LoRA keys and metadata belong to


class ExportError(CheckpointError):
    """Checkpoint weights that do not fit the export asked for (not LoRA weights, another rank or model)."""


def lora_state_dict(weights: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Checkpoint names (`blocks.0.attn1.to_q.lora_A.default.weight`) to diffusers' Wan LoRA keys
    (`transformer.blocks.0.attn1.to_q.lora_A.weight`), as float32 contiguous CPU tensors."""
    marker = {f".lora_A.{adapter_name}.": ".lora_A.", f".lora_B.{adapter_name}.": ".lora_B."}
    converted = {}
    for name, tensor in sorted(weights.items()):
        found = [key for key in marker if key in name]
        if not found:
            raise ExportError(f"{name} is not a weight of LoRA adapter {adapter_name!r}: "
                              f"was the checkpoint trained with model.finetune lora?")
        converted[f"{PREFIX}.{name.replace(found[0], marker[found[0]])}"] = tensor.detach().float().cpu().contiguous()
    if not converted:
        raise ExportError("no LoRA weights to export")
    return converted


def lora_metadata(config: LoraConfig) -> dict[str, str]:
    """The safetensors metadata diffusers reads the adapter's `LoraConfig` from (keys `transformer.<field>`)."""
    fields = {f"{PREFIX}.{key}": sorted(value) if isinstance(value, set) else value
              for key, value in config.to_dict().items()}
    return {LORA_METADATA_KEY: json.dumps(fields, indent=2, sort_keys=True)}


def check_lora_shapes(state: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """Every A is [r, in] and every B [out, r] for the config's rank r, and each A has its B."""
    for key, tensor in state.items():
        rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1]
        if rank != config.r:
            raise ExportError(f"{key} has rank {rank}, the LoRA config says r {config.r}: "
                              f"was the checkpoint trained with other model.lora_rank?")
        partner = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
        if partner not in state:
            raise ExportError(f"{key} has no {partner}")


def transformer_from_weights(weights: dict[str, torch.Tensor], config: dict) -> WanTransformer3DModel:
    """A `WanTransformer3DModel` of `config` whose parameters are `weights` (float32), every one of them.

    Built on the meta device, then given the tensors themselves (`assign`), so no memory is spent
    on an initialisation that is thrown away."""
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    expected = set(model.state_dict())
    if set(weights) != expected:
        absent, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ExportError(f"the weights do not make a whole transformer: {len(absent)} absent (e.g. {absent[:2]}), "
                          f"{len(extra)} unexpected (e.g. {extra[:2]}); was the checkpoint trained with "
                          f"model.finetune full?")
    model.load_state_dict({name: tensor.detach().float().cpu().contiguous() for name, tensor in weights.items()},
                          strict=True, assign=True)
    return model.eval()


def write_export(directory: str | os.PathLike, weights: dict[str, torch.Tensor], info: dict,
                 lora: LoraConfig | None = None, transformer_config: dict | None = None) -> Path:
    """Write the export folder atomically: `pytorch_lora_weights.safetensors` when `lora` is given,
    else `transformer/` (a `save_pretrained` folder of `transformer_config` with `weights`), and
    `export.json` (`info` plus the file list). Returns the folder."""
    from safetensors.torch import save_file

    if (lora is None) == (transformer_config is None):
        raise ValueError("pass exactly one of `lora` (a LoRA export) and `transformer_config` (a full one)")
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        if lora is not None:
            state = lora_state_dict(weights)
            check_lora_shapes(state, lora)
            save_file(state, str(staging / LORA_WEIGHT_NAME), metadata=lora_metadata(lora))
            info = {**info, "lora": {"rank": lora.r, "alpha": lora.lora_alpha, "scale": lora.lora_alpha / lora.r}}
        else:
            transformer_from_weights(weights, transformer_config).save_pretrained(staging / TRANSFORMER_FOLDER)
        files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
        (staging / INFO_NAME).write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=True) + "\n")
    return directory
