"""Unreadable weights end in a ModelPathError (exit code 2 in a stage) naming the file, and the
tensor when its shape does not fit the config: a truncated file, a bad safetensors header, weights
of another model size. The toy base (toy.load_base) and a Wan folder (models/wan.load_stack)."""

import json
import shutil
from pathlib import Path

import pytest

from flash_grpo_core.tasks import toy
from flash_grpo_core.config import ToyConfig
from flash_grpo_core.models.layout import ModelPathError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "bench" / "toy" / "base"


def _damaged(path: Path, kind: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\xff" * 8 + data[8:])


@pytest.mark.parametrize("kind", ["truncated", "header"])
def test_a_damaged_toy_base_names_the_file(tmp_path, tiny_params, kind):
    shutil.copytree(SHIPPED, tmp_path / "base")
    _damaged(tmp_path / "base" / toy.BASE_WEIGHTS, kind)
    stack = toy.build_toy_stack(tiny_params("toy").toy)
    with pytest.raises(ModelPathError, match=f"{tmp_path / 'base' / toy.BASE_WEIGHTS}: not a readable safetensors"):
        toy.load_base(stack, tmp_path / "base")


def test_a_toy_base_of_other_sizes_names_the_file_and_the_tensor(tiny_params):
    other = ToyConfig(**{**vars(tiny_params("toy").toy), "ffn_dim": 128})
    with pytest.raises(ModelPathError, match=r"transformer.safetensors: tensor blocks\.0\.ffn\.\S+ has shape"):
        toy.load_base(toy.build_toy_stack(other), SHIPPED)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from flash_grpo_core.models.random_stacks import build_tiny_stack
    from flash_grpo_core.models.wan import save_stack

    folder = tmp_path_factory.mktemp("wan") / "stack"
    save_stack(build_tiny_stack(), folder)
    return folder


@pytest.mark.parametrize("kind", ["truncated", "header"])
def test_a_damaged_wan_weight_file_names_the_component_and_file(tmp_path, wan_folder, kind):
    from flash_grpo_core.models.wan import load_stack

    folder = shutil.copytree(wan_folder, tmp_path / "stack")
    _damaged(folder / "transformer" / "diffusion_pytorch_model.safetensors", kind)
    with pytest.raises(ModelPathError) as error:
        load_stack(folder)
    message = str(error.value)
    assert "cannot load transformer/" in message and "diffusion_pytorch_model.safetensors" in message
    assert "\n" not in message


def test_wan_weights_of_another_size_name_the_tensor(tmp_path, wan_folder):
    from flash_grpo_core.models.wan import load_stack

    folder = shutil.copytree(wan_folder, tmp_path / "stack")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "ffn_dim": 2 * config["ffn_dim"]}))
    with pytest.raises(ModelPathError, match=r"cannot load transformer/ .*blocks\.0\.ffn\.\S+ expected shape"):
        load_stack(folder)


def test_a_checkpoint_ema_of_another_shape_names_the_file_and_the_tensor(tmp_path):
    import torch

    from flash_grpo_core.artifacts.checkpoint import CheckpointError, CheckpointTensors, read_checkpoint, write_checkpoint

    tensors = CheckpointTensors({"blocks.0.lora_A": torch.zeros(4, 2)}, {"blocks.0.lora_A": torch.zeros(2, 4)}, {}, 0)
    write_checkpoint(tensors, tmp_path / "checkpoint", {"iteration": 0})
    with pytest.raises(CheckpointError, match=r"ema.safetensors: tensor blocks.0.lora_A has shape \(2, 4\), "
                                              r"trainable.safetensors \(4, 2\)"):
        read_checkpoint(tmp_path / "checkpoint", optimizer=False)
