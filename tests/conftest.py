"""Shared fixtures: telemetry off, the tiny preset's parameters and engine."""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow reads DO_NOT_TRACK only as "true"
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (the README's test command): each of the N workers and every process it starts
    # (stages, torchrun ranks, benchmarks) computes on one thread, so N workers share N cores instead
    # of each spreading torch's threads over all of them. Set before anything imports torch.
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dvc_cache(tmp_path_factory):
    """One DVC cache for the session's scratch workspaces: a stage that one test module ran (same
    command, dependencies and params) is restored from the run cache in the next instead of run again."""
    return tmp_path_factory.mktemp("dvc-cache")


@pytest.fixture
def tiny_params():
    """Factory: the repository's tiny preset with dotted overrides (`train__mode="full"`).

    Runs on the CPU unless `model__device` says otherwise: bit-identity is a CPU guarantee, and GPU
    checks live in test_gpu.py.
    """
    from flash_grpo_core.config import load_params

    def make(preset="tiny", **overrides):
        overrides.setdefault("model__device", "cpu")
        return load_params(ROOT / "params.yaml", preset=preset,
                           overrides={key.replace("__", "."): value for key, value in overrides.items()})

    return make


# The modules that take longest (minutes of stage subprocesses each), started first: `-n N --dist
# loadfile` hands whole modules to idle workers in collection order, and a long module dealt last
# leaves the other workers idle at the end. Each module keeps its tests' order (some build on the
# previous test's outputs).
LONGEST_FIRST = ("test_pipeline", "test_rehearsal_wan", "test_prefect_integration", "test_integrity", "test_distributed",
                 "test_toy", "test_faults", "test_flows")


def pytest_configure(config):
    # pytest-xdist would otherwise deal the modules by their number of tests, most first, which put
    # the four long Prefect tests near the end: keep the collection order above
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept within
