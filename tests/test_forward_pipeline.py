"""`dvc repro` through the update of iteration 1 with each forward-process mode (`nft`, `awm`) on
the tiny preset, in one scratch workspace whose stages run warm (tests/warm_runner.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flash_grpo_core.pipeline.workspace import copy_project, tool_env
from warm_runner import warm_runner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, dvc_cache):
    project = copy_project(ROOT, tmp_path_factory.mktemp("forward"), preset="tiny", iterations=1, cache_dir=dvc_cache)
    with warm_runner(project, min_served=8):
        yield project


def _select(project: Path, mode: str) -> None:
    """train.mode and a fraction of the 20 steps as noise levels, in the copy's params.yaml."""
    params = project / "params.yaml"
    text = params.read_text()
    for old, new in (("\n  mode: ", f"\n  mode: {mode}  # "),
                     ("\n  timestep_fraction: ", "\n  timestep_fraction: 0.2  # ")):
        assert text.count(old) == 1, old  # the base train section's key
        text = text.replace(old, new)
    params.write_text(text)


@pytest.mark.parametrize("mode", ["nft", "awm"])
def test_each_forward_mode_runs_its_rollout_and_update_through_dvc(project, mode):
    from flash_grpo_core.artifacts.shards import read_shards

    original = (project / "params.yaml").read_text()
    _select(project, mode)
    try:
        result = subprocess.run([str(BIN / "dvc"), "repro", "update@1"], cwd=project, env=tool_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        it1 = project / "runs" / "tiny" / "it1"
        records = read_shards(it1 / "rollout")
        assert len(records) == 8 and all(r.steps.numel() == 0 and r.final_latents is not None for r in records)
        manifest = json.loads((it1 / "rollout" / "manifest.json").read_text())
        assert manifest["forward_passes"] == 8 * 20 * 2  # the ODE, guided, no SDE step stored
        metrics = json.loads((it1 / "metrics.json").read_text())
        assert metrics["train_backward_passes"] > 0 and metrics["first_ratio_deviation"] < 1e-4
        assert set(metrics["per_step"]) <= {f"k{k}" for k in range(4)}  # the 4 noise levels
    finally:
        (project / "params.yaml").write_text(original)
