"""Wan 2.1 without torch: what a Diffusers-format T2V folder must hold (checked without loading any
weights), and the transformer configurations of the released 1.3B and 14B models.

`wan.py` loads such folders and `random_stacks.py` builds the architectures; the pipeline's
`validate` stage (`flash_grpo_core/pipeline/inputs.py`) checks the folder before any stage starts, with the
same message, and the preflight (`flash_grpo_core/pipeline/preflight.py`) also sizes a run from the configs,
in processes that need not import torch.
"""

from __future__ import annotations

from pathlib import Path

# The component folders `wan.load_stack` needs. The scheduler folder is not among them: sampling
# uses this project's own SDE step.
REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")

# Wan 2.1 T2V transformer configurations (Diffusers format); the VAE's defaults are Wan 2.1's VAE.
WAN_TRANSFORMER_CONFIGS = {
    "wan1_3b": {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30},
    "wan14b": {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40},
}
WAN_SHARED_CONFIG = {
    "patch_size": (1, 2, 2), "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}


class ModelPathError(FileNotFoundError):
    """`model.path` does not point at a complete Diffusers-format Wan 2.1 T2V folder, or its weights
    cannot be read; the message names the folder or file."""


def missing_parts(root: Path) -> list[str]:
    """What a Diffusers-format Wan folder at `root` lacks, as human-readable items."""
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for component in REQUIRED_COMPONENTS:
        folder = root / component
        if not folder.is_dir():
            missing.append(f"{component}/ (folder)")
            continue
        if not (folder / "config.json").is_file():
            missing.append(f"{component}/config.json")
        if not any(file.name.endswith(WEIGHT_SUFFIXES) for file in folder.iterdir()):
            missing.append(f"{component}/ weights (*.safetensors or *.bin)")
    tokenizer_folder = root / "tokenizer"
    if not tokenizer_folder.is_dir():
        missing.append("tokenizer/ (folder)")
    elif not any((tokenizer_folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer/ vocabulary (tokenizer.json or spiece.model)")
    return missing


def check_model_folder(root: Path) -> None:
    """ModelPathError naming what is missing when `root` is not a complete Wan 2.1 T2V folder."""
    hint = (
        "Set `model.path` in params.yaml to a local Diffusers-format Wan 2.1 T2V folder "
        "(e.g. a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."
    )
    if not root.is_dir():
        raise ModelPathError(f"Wan model folder {root} does not exist. {hint}")
    missing = missing_parts(root)
    if missing:
        raise ModelPathError(f"Wan model folder {root} is incomplete: missing {', '.join(missing)}. {hint}")
