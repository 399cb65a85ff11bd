"""AdamW's moments beside the checkpoint (`train.optimizer_state: beside`): the checkpoint stays a
DVC output of weights and EMA, the moments live in <run>/optimizer/it<k>, pruned to the latest ones."""

import pytest
import torch

from flash_grpo_core.artifacts.checkpoint import (
    CheckpointError,
    CheckpointTensors,
    moments_folder,
    prune_moments,
    read_checkpoint,
    write_checkpoint,
)


def _tensors(scale: float = 1.0) -> CheckpointTensors:
    weights = {"blocks.0.attn.lora_A": scale * torch.arange(12.0).reshape(3, 4)}
    moments = {"blocks.0.attn.lora_A::exp_avg": torch.full((3, 4), 0.5 * scale),
               "blocks.0.attn.lora_A::exp_avg_sq": torch.full((3, 4), 0.25 * scale),
               "blocks.0.attn.lora_A::step": torch.tensor(3.0)}
    return CheckpointTensors(weights, {k: v + 1 for k, v in weights.items()}, moments, ema_steps=3)


def _same(left: dict, right: dict) -> bool:
    return set(left) == set(right) and all(torch.equal(left[k], right[k]) for k in left)


def test_the_moments_go_beside_and_read_back_equal(tmp_path):
    checkpoint = tmp_path / "run" / "it1" / "checkpoint"
    write_checkpoint(_tensors(), checkpoint, {"iteration": 1}, beside=True)
    assert moments_folder(checkpoint) == tmp_path / "run" / "optimizer" / "it1"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["checksums.json", "ema.safetensors", "state.json",
                                                            "trainable.safetensors"]
    assert sorted(p.name for p in moments_folder(checkpoint).iterdir()) == ["checksums.json", "optimizer.safetensors"]
    tensors, state = read_checkpoint(checkpoint)
    assert state["optimizer_beside"] == "../../optimizer/it1"
    expected = _tensors()
    assert _same(tensors.weights, expected.weights) and _same(tensors.optimizer, expected.optimizer)
    inside = tmp_path / "inside" / "it1" / "checkpoint"  # the default layout holds the same tensors
    write_checkpoint(_tensors(), inside, {"iteration": 1})
    assert _same(read_checkpoint(inside)[0].optimizer, tensors.optimizer)


def test_only_the_update_needs_the_moments(tmp_path):
    checkpoint = tmp_path / "run" / "it4" / "checkpoint"
    write_checkpoint(_tensors(), checkpoint, {"iteration": 4}, beside=True)
    (moments_folder(checkpoint) / "optimizer.safetensors").unlink()
    tensors, _ = read_checkpoint(checkpoint, optimizer=False)  # rollout, evaluation, export
    assert tensors.optimizer == {} and _same(tensors.ema, _tensors().ema)
    with pytest.raises(CheckpointError, match=r"keeps AdamW's moments in .*optimizer/it4, which is gone"):
        read_checkpoint(checkpoint)


def test_damaged_moments_are_named(tmp_path):
    checkpoint = tmp_path / "run" / "it2" / "checkpoint"
    write_checkpoint(_tensors(), checkpoint, {"iteration": 2}, beside=True)
    moments = moments_folder(checkpoint) / "optimizer.safetensors"
    data = bytearray(moments.read_bytes())
    data[-3] ^= 1
    moments.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer/it2/optimizer.safetensors: .* checksums.json says"):
        read_checkpoint(checkpoint)


def test_pruning_keeps_the_latest_iterations(tmp_path):
    for iteration in range(1, 6):
        checkpoint = tmp_path / "run" / f"it{iteration}" / "checkpoint"
        write_checkpoint(_tensors(iteration), checkpoint, {"iteration": iteration}, beside=True)
        prune_moments(checkpoint, keep=2)
    assert sorted(p.name for p in (tmp_path / "run" / "optimizer").iterdir()) == ["it4", "it5"]
    assert read_checkpoint(tmp_path / "run" / "it5" / "checkpoint")[0].optimizer["blocks.0.attn.lora_A::exp_avg"][0, 0] == 2.5
    assert prune_moments(tmp_path / "elsewhere" / "checkpoint", keep=1) == []  # not <run>/it<k>/checkpoint
