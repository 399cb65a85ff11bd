"""The export stage against diffusers itself: the exported weights, loaded the way a user loads them
(`WanPipeline.load_lora_weights`, `WanTransformer3DModel.from_pretrained`) into a `WanPipeline` built
from the tiny stack's Diffusers folder, give the engine's velocity and the evaluation's ODE sample.

The pipeline samples with a scheduler that takes the engine's sigmas (`EngineSigmasEuler` below):
`WanPipeline` calls `scheduler.set_timesteps(num_steps)` itself, and no diffusers scheduler gives the
transformer the integer timesteps `int(1000 sigma)` the evaluation uses (FlowMatchEulerDiscrete
passes `1000 sigma` unrounded and refuses integer timesteps in `step`), so the test supplies the
few lines of a flow-match Euler scheduler that does.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

from flash_grpo_core.artifacts.checkpoint import config_record, save_checkpoint
from flash_grpo_core.config import load_params, read_yaml
from flash_grpo_core.engine.iteration import build_engine, build_stack, sample_ode
from flash_grpo_core.engine.sampler import _draw, sample_generators
from flash_grpo_core.method.schedule import flow_sigmas, timesteps
from flash_grpo_core.models.export import LORA_WEIGHT_NAME
from flash_grpo_core.models.wan import save_stack
from stages.runtime import common
from stages import export as export_stage

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square moving left", "a blue square moving up"]


class EngineSigmasEuler:
    """Flow-match Euler steps on fixed float64 sigmas [N + 1], the transformer given `int(1000 sigma)`:
    what the evaluation's ODE sampler does, in the scheduler interface WanPipeline calls."""

    order = 1

    def __init__(self, sigmas: torch.Tensor):
        self.fixed = sigmas

    def set_timesteps(self, num_inference_steps: int, device=None):
        assert num_inference_steps == len(self.fixed) - 1
        self.timesteps = timesteps(self.fixed).to(device)  # [N] int64
        self.sigmas = self.fixed.float()  # [N + 1]: FlowMatchEulerDiscrete keeps float32 sigmas
        self.index = 0

    def set_begin_index(self, begin_index: int = 0):
        self.index = begin_index

    def step(self, model_output, timestep, sample, return_dict=False):
        dt = self.sigmas[self.index + 1] - self.sigmas[self.index]  # as FlowMatchEulerDiscreteScheduler.step
        self.index += 1
        return ((sample.float() + dt * model_output.float()).to(sample.dtype),)


def scratch_params(tmp_path: Path, **tiny: dict) -> Path:
    """The repository's params.yaml on the tiny preset, on the CPU, 4 ODE steps, with `tiny`'s
    sections merged into its preset overrides; written as JSON (valid YAML 1.2)."""
    raw = read_yaml(ROOT / "params.yaml")
    raw["preset"] = "tiny"
    overrides = raw.setdefault("presets", {}).setdefault("tiny", {})
    for section, values in {"model": {"device": "cpu"}, "eval": {"num_steps": 4}, **tiny}.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(raw))
    return path


def trained_checkpoint(params, path: Path, iteration: int = 1) -> Path:
    """A checkpoint whose weights and EMA both moved away from the init, differently (under LoRA B
    starts at zero: without this the adapter would be a no-op and any export would pass)."""
    engine = build_engine(params, text_encoder=False)
    generator = torch.Generator().manual_seed(7)
    scale = 0.3 if params.model.finetune == "lora" else 0.02
    with torch.no_grad():
        for name, param in engine.policy.parameters.items():
            param.add_(scale * torch.randn(param.shape, generator=generator))
            engine.policy.ema.shadow[name] = param.detach().float() + scale * torch.randn(param.shape,
                                                                                          generator=generator)
    save_checkpoint(engine.policy, path, {"iteration": iteration, "preset": params.preset,
                                          "config": config_record(params), "history": []})
    return path


def run_export(params_path: Path, checkpoint: Path, out: Path, iteration: int = 1) -> int:
    return export_stage.main(["--params", str(params_path), "--iteration", str(iteration),
                              "--checkpoint", str(checkpoint), "--out", str(out)])


def base_folder(params, tmp_path: Path) -> Path:
    """The engine's base model (the seeded tiny stack) as the Diffusers folder a user downloads."""
    save_stack(build_stack(params, torch.float32), tmp_path / "base")
    return tmp_path / "base"


def velocity(transformer, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 3, 4, 4, generator=generator)  # [S, C, F, H, W]
    text = torch.randn(2, 16, 32, generator=generator)  # [S, L, D]
    with torch.no_grad():
        return transformer(hidden_states=latents, timestep=torch.tensor([999, 412]), encoder_hidden_states=text,
                           return_dict=False)[0]


def pipeline_sample(pipe: WanPipeline, params, prompt_index: int) -> np.ndarray:
    """The pipeline's video uint8 [F, H, W, 3] from the noise the evaluation draws for prompt `prompt_index`."""
    r, e = params.rollout, params.eval
    shape = (16, (r.frames - 1) // 4 + 1, r.height // 8, r.width // 8)  # [C, F, H, W] of the latent
    noise = _draw(sample_generators(e.seed, [prompt_index]), shape)  # [1, C, F, H, W]
    pipe.scheduler = EngineSigmasEuler(flow_sigmas(e.num_steps, r.shift, r.schedule))
    frames = pipe(prompt=PROMPTS[prompt_index], negative_prompt=r.negative_prompt, height=r.height, width=r.width,
                  num_frames=r.frames, num_inference_steps=e.num_steps, guidance_scale=e.guidance, latents=noise,
                  max_sequence_length=params.model.text_len, output_type="np").frames[0]  # [F, H, W, 3] in [0, 1]
    return np.round(frames * 255).astype(np.uint8)


def check_matches_evaluation(pipe: WanPipeline, params, checkpoint: Path) -> None:
    """The pipeline reproduces the engine with the checkpoint's EMA weights: velocity to float
    tolerance, the evaluation's ODE videos to one uint8 level."""
    engine, _ = common.engine_at(params, str(checkpoint))
    with engine.policy.ema.applied():
        ours = velocity(engine.policy.transformer)
        videos = sample_ode(engine, PROMPTS, params.eval.num_steps, params.eval.guidance, params.eval.seed)
    torch.testing.assert_close(velocity(pipe.transformer), ours, rtol=1e-4, atol=1e-5)
    for index in range(len(PROMPTS)):
        theirs = torch.from_numpy(pipeline_sample(pipe, params, index))
        assert theirs.shape == videos[index].shape
        assert (theirs.int() - videos[index].int()).abs().max() <= 1


def test_lora_export_loads_into_wan_pipeline_and_reproduces_the_evaluation(tmp_path):
    params_path = scratch_params(tmp_path)
    params = load_params(params_path)
    checkpoint = trained_checkpoint(params, tmp_path / "it1" / "checkpoint")
    out = tmp_path / "export"
    assert run_export(params_path, checkpoint, out) == 0

    info = json.loads((out / "export.json").read_text())
    assert info["files"] == [LORA_WEIGHT_NAME]
    assert info["lora"] == {"rank": 16, "alpha": 32, "scale": 2.0} and info["use_ema"] and info["iteration"] == 1
    pipe = WanPipeline.from_pretrained(base_folder(params, tmp_path), local_files_only=True)
    base_velocity = velocity(pipe.transformer)
    pipe.load_lora_weights(str(out))
    scalings = {value for module in pipe.transformer.modules() for value in getattr(module, "scaling", {}).values()}
    assert scalings == {2.0}  # alpha / r from the file's metadata, not diffusers' fallback alpha = r
    assert (velocity(pipe.transformer) - base_velocity).abs().max() > 1e-2  # the adapter does something
    check_matches_evaluation(pipe, params, checkpoint)


def test_lora_file_is_what_diffusers_own_saving_writes(tmp_path):
    """Same tensors and adapter metadata as a diffusers LoRA training script's save (peft's
    `get_peft_model_state_dict`, `_collate_lora_metadata`, `WanPipeline.save_lora_weights`)."""
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    params_path = scratch_params(tmp_path)
    params = load_params(params_path)
    checkpoint = trained_checkpoint(params, tmp_path / "it1" / "checkpoint")
    assert run_export(params_path, checkpoint, tmp_path / "export") == 0
    engine, _ = common.engine_at(params, str(checkpoint))
    with engine.policy.ema.applied():
        transformer = engine.policy.transformer
        WanPipeline.save_lora_weights(tmp_path / "diffusers", get_peft_model_state_dict(transformer),
                                      **_collate_lora_metadata({"transformer": transformer}))
    ours, theirs = tmp_path / "export" / LORA_WEIGHT_NAME, tmp_path / "diffusers" / LORA_WEIGHT_NAME
    expected = load_file(theirs)
    assert load_file(ours).keys() == expected.keys()
    for key, tensor in load_file(ours).items():
        assert torch.equal(tensor, expected[key]), key
    metadata = [json.loads(safe_open(str(path), "pt").metadata()["lora_adapter_metadata"]) for path in (ours, theirs)]
    for record in metadata:
        record["transformer.target_modules"] = sorted(record["transformer.target_modules"])
    assert metadata[0] == metadata[1]
    assert metadata[0]["transformer.r"] == 16 and metadata[0]["transformer.lora_alpha"] == 32


def test_full_export_loads_with_from_pretrained_and_reproduces_the_evaluation(tmp_path):
    params_path = scratch_params(tmp_path, model={"finetune": "full"})
    params = load_params(params_path)
    checkpoint = trained_checkpoint(params, tmp_path / "it1" / "checkpoint")
    out = tmp_path / "export"
    assert run_export(params_path, checkpoint, out) == 0

    assert json.loads((out / "export.json").read_text())["files"] == [
        "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]
    transformer = WanTransformer3DModel.from_pretrained(out / "transformer", local_files_only=True)
    pipe = WanPipeline.from_pretrained(base_folder(params, tmp_path), transformer=transformer, local_files_only=True)
    check_matches_evaluation(pipe, params, checkpoint)


def test_export_of_the_trained_weights_and_of_a_wrong_checkpoint(tmp_path, capsys):
    params_path = scratch_params(tmp_path, export={"use_ema": False})
    params = load_params(params_path)
    checkpoint = trained_checkpoint(params, tmp_path / "it1" / "checkpoint")
    out = tmp_path / "export"
    assert run_export(params_path, checkpoint, out) == 0
    trained = load_file(checkpoint / "trainable.safetensors")
    exported = load_file(out / LORA_WEIGHT_NAME)
    name = "blocks.0.attn1.to_q.lora_B.default.weight"
    assert torch.equal(exported["transformer.blocks.0.attn1.to_q.lora_B.weight"], trained[name])
    assert json.loads((out / "export.json").read_text())["use_ema"] is False

    assert run_export(params_path, checkpoint, tmp_path / "other", iteration=2) == common.INPUT_ERROR_EXIT
    assert "holds iteration 1, not 2" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    full = scratch_params(tmp_path / "full", model={"finetune": "full"})  # a LoRA checkpoint, full params
    assert run_export(full, checkpoint, tmp_path / "other") == common.INPUT_ERROR_EXIT
    assert "model.finetune" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_export_is_byte_reproducible(tmp_path):
    """Two exports of one checkpoint are the same bytes (one metadata key: see models/export.py)."""
    params_path = scratch_params(tmp_path)
    checkpoint = trained_checkpoint(load_params(params_path), tmp_path / "it1" / "checkpoint")
    assert run_export(params_path, checkpoint, tmp_path / "a") == 0
    assert run_export(params_path, checkpoint, tmp_path / "b") == 0
    for name in (LORA_WEIGHT_NAME, "export.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_export_section_is_typed_and_rejects_unknown_keys(tmp_path):
    from flash_grpo_core.config import ConfigError

    assert load_params(scratch_params(tmp_path)).export.use_ema is True
    with pytest.raises(ConfigError, match="export.iteration"):
        load_params(scratch_params(tmp_path, export={"iteration": 3}))
    with pytest.raises(ConfigError, match="export.use_ema must be true/false"):
        load_params(scratch_params(tmp_path, export={"use_ema": "yes"}))


def test_exporting_an_ema_never_folded_in_warns(tmp_path, capsys):
    params_path = scratch_params(tmp_path, train={"ema_every": 8})
    checkpoint = trained_checkpoint(load_params(params_path), tmp_path / "it1" / "checkpoint")  # 0 optimizer steps
    assert run_export(params_path, checkpoint, tmp_path / "export") == 0
    assert "export: warning: the EMA of iteration 1 was never folded in" in capsys.readouterr().err
