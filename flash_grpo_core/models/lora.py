"""LoRA adapters through peft, full fine-tuning, and the adapter-free reference model for the KL term."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from flash_grpo_core.config.choices import DEFAULT_LORA_TARGETS, LORA_COMPUTES, LORA_INITS


def lora_config(rank: int = 16, alpha: int = 32, target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
                init: str = "gaussian") -> LoraConfig:
    """The peft config of the adapter `apply_lora` attaches (and the exported LoRA file describes)."""
    if init not in LORA_INITS:
        raise ValueError(f"unknown LoRA init {init!r}; expected one of {LORA_INITS}")
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian" if init == "gaussian" else True,
                      target_modules=list(target_modules))


def apply_lora(
    transformer: WanTransformer3DModel,
    rank: int = 16,
    alpha: int = 32,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    seed: int = 0,
    init: str = "gaussian",
    compute: str = "input",
) -> None:
    """Attach a LoRA adapter in place; afterwards only the LoRA weights require grad.

    The defaults are the authors' Wan recipe (r 16, alpha 32, attention projections only, Gaussian
    A). `init`: `gaussian` draws A from N(0, 1/rank^2) (peft's "gaussian"); `default` is peft's
    kaiming-uniform A, std 1/sqrt(3 fan_in), about 4x smaller for Wan 1.3B's 1536 features. Either
    way B is zero, so the adapter starts as a no-op. A is drawn from a generator seeded by `seed`
    (peft draws from the global RNG), so runs are reproducible. LoRA weights are kept in fp32 even
    when the base is bf16 (AdamW's updates would fall below bf16's spacing). `compute` says where
    the adapters multiply: `input`, in the layer input's dtype (`compute_in_input_dtype`; bf16 over
    a bf16 base, as in the authors' runs), or `float32`, peft's way (it casts each adapted layer's
    input to float32 and the result back).
    """
    if compute not in LORA_COMPUTES:
        raise ValueError(f"unknown LoRA compute {compute!r}; expected one of {LORA_COMPUTES}")
    config = lora_config(rank, alpha, target_modules, init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    transformer.requires_grad_(False)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)
    if compute == "input":
        compute_in_input_dtype(transformer)


class _InputDtypeLinear(torch.nn.Linear):
    """An adapter matrix stored in float32 that multiplies in its input's dtype: the weight (rank x
    features, 48 KB at Wan 1.3B) is cast per call, and the gradient reaches the float32 weight
    through the cast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def compute_in_input_dtype(transformer: torch.nn.Module) -> None:
    """Make every LoRA layer compute its adapter in the layer input's dtype (bf16 over a bf16 base)
    instead of casting the input to the float32 adapter: peft's cast writes and reads activation-
    sized float32 tensors in every adapted layer (200 MB each at Wan's 32,760 tokens), memory-bound
    work estimated to be most of what a LoRA update spent beyond a full-weight one on an H200
    (docs/distributed.md). The weights stay float32 parameters under their names; over a float32
    base nothing changes."""
    for layer in transformer.modules():
        if isinstance(layer, LoraLayer):
            layer.cast_input_dtype_enabled = False  # peft's switch for its input cast
            for matrix in (*layer.lora_A.values(), *layer.lora_B.values()):
                if type(matrix) is torch.nn.Linear:
                    matrix.__class__ = _InputDtypeLinear  # same module, same parameters, its forward


def enable_full_finetune(transformer: WanTransformer3DModel) -> None:
    """Make every transformer parameter trainable (full-weight GRPO instead of LoRA)."""
    transformer.requires_grad_(True)


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter for the parameters that require grad, sorted by name."""
    return {name: param for name, param in sorted(module.named_parameters()) if param.requires_grad}


@contextlib.contextmanager
def adapters_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """Run the transformer as its base model (the KL reference) inside the block.

    Restores each adapter layer's previous state afterwards, also on exception, and every
    parameter's `requires_grad`: peft's enable/disable toggles `requires_grad` of the adapter
    weights as a side effect. A no-op for a model without adapters.
    """
    layers = [module for module in transformer.modules() if isinstance(module, BaseTunerLayer)]
    grad_flags = [(param, param.requires_grad) for param in transformer.parameters()]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for param, flag in grad_flags:
            param.requires_grad_(flag)
