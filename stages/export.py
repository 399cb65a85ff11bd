"""`export` stage: a checkpoint's weights as diffusers users load them.

    python -m stages.export --iteration 2 --checkpoint runs/tiny/it2/checkpoint --out runs/tiny/export

Takes the EMA weights (`export.use_ema`, the default: what the evaluation samples with) or the raw
trained weights of the checkpoint (dvc.yaml: the last one, `iterations`) and writes the folder
`--out`, replaced as a whole when complete:

- `model.finetune: lora`: `pytorch_lora_weights.safetensors`, the layout diffusers' Wan LoRA
  training scripts save: keys `transformer.blocks.<i>.attn{1,2}.<proj>.lora_{A,B}.weight`
  (float32), the adapter's `LoraConfig` (r, lora_alpha, target modules) as JSON in the safetensors
  metadata `lora_adapter_metadata`, so diffusers applies the trained scale alpha / r. Load it with
  `WanPipeline.from_pretrained(<base>).load_lora_weights("<out>")`.
- `model.finetune: full`: `transformer/` (config.json, diffusion_pytorch_model*.safetensors in
  float32), from `save_pretrained`. Load it with
  `WanPipeline.from_pretrained(<base>, transformer=WanTransformer3DModel.from_pretrained("<out>/transformer"))`.
- `export.json`: iteration, use_ema, finetune, preset, base (the `model.path` the weights belong
  on; the tiny and toy presets build theirs in code), for LoRA its rank, alpha and scale, and the
  files.

The base model is not copied. The conversion is flash_grpo_core/models/export.py.
"""

from __future__ import annotations

from stages.runtime import common


def main(argv=None) -> int:
    parser = common.parser("export", __doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True, help="the checkpoint's iteration")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to export")
    parser.add_argument("--out", required=True, help="the export folder to write")
    args = parser.parse_args(argv)
    return common.run("export", work, args, argv)


def base_transformer_config(params) -> dict:
    """The base transformer's config (full fine-tuning writes it with the weights): built in code for
    the tiny and toy presets, read from `model.path` otherwise (no weights are loaded)."""
    from pathlib import Path

    if not params.uses_wan_weights:
        import torch

        from flash_grpo_core.engine.iteration import build_stack

        return dict(build_stack(params, torch.float32, text_encoder=False).transformer.config)
    from diffusers import WanTransformer3DModel

    from flash_grpo_core.models.wan import ModelPathError

    folder = Path(params.model.path) / "transformer"
    if not (folder / "config.json").is_file():
        raise ModelPathError(f"{folder / 'config.json'} is missing: set model.path to the base Wan 2.1 folder")
    return dict(WanTransformer3DModel.load_config(folder))


def work(args) -> dict:
    """Write the checkpoint's (EMA or raw) weights as diffusers loads them."""
    from flash_grpo_core.artifacts.checkpoint import CheckpointError, check_config, read_weights
    from flash_grpo_core.engine.ema import unfolded_warning
    from flash_grpo_core.models.export import write_export

    params = common.load_params(args.params)
    state = check_config(args.checkpoint, params)  # the weights must fit the model and LoRA settings
    if state["iteration"] != args.iteration:
        raise CheckpointError(f"{args.checkpoint} holds iteration {state['iteration']}, not {args.iteration}")
    use_ema, model = params.export.use_ema, params.model
    if use_ema:
        common.warn("export", unfolded_warning(int(state["ema_steps"]), params.train.ema_every, args.iteration,
                                                "export.use_ema"))
    weights = read_weights(args.checkpoint, ema=use_ema)
    info = {"iteration": args.iteration, "use_ema": use_ema, "finetune": model.finetune, "preset": params.preset,
            "base": model.path if params.preset != "tiny" else f"tiny preset built in code (seed {params.seed})"}
    if model.finetune == "lora":
        from flash_grpo_core.models.lora import lora_config

        config = lora_config(model.lora_rank, model.lora_alpha, model.lora_targets, model.lora_init)
        write_export(args.out, weights, info, lora=config)
    else:
        write_export(args.out, weights, info, transformer_config=base_transformer_config(params))
    return {"iteration": args.iteration, "finetune": model.finetune, "use_ema": use_ema, "tensors": len(weights)}


if __name__ == "__main__":
    common.finish(main())
