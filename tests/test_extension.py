"""A new reward and a new training mode are one class each, registered where they are written (here,
as a user's package would) and then selectable from params.yaml like the built-in ones
(docs/architecture.md, "Add a reward" and "Add a training mode")."""

import pytest
import torch

from flash_grpo_core.config import ConfigError
from flash_grpo_core.engine.iteration import build_engine, generate, plan_steps, reward_from_params, run_iteration
from flash_grpo_core.method.batch import PassCounter
from flash_grpo_core.method.modes import MODES, TrainingMode, register_mode
from flash_grpo_core.rewards import RewardOutput, available_rewards, check_videos, register
from flash_grpo_core.rewards.base import _FACTORIES, _REQUIRED

PROMPTS = ["a red square moving left", "a blue ball bouncing"]


class Darkness:
    """1 for a black video, 0 for a white one."""

    def __init__(self, gamma: float = 1.0, frame_stride: int = 1):
        self.gamma = gamma

    def __call__(self, videos, prompts, metadata=None):
        check_videos(videos, prompts)
        return RewardOutput(scores=(1 - videos.float().mean(dim=(1, 2, 3, 4)) / 255) ** self.gamma, info={})


class LastCandidate(TrainingMode):
    """Every sample trains the last of the K candidate steps: a mode whose plan draws nothing."""

    name = "last_candidate"
    rectify = "exact"

    def problems(self, rollout, train):
        return [] if rollout.num_candidates >= 2 else ["rollout.num_candidates must be >= 2 for last_candidate"]

    def trained_steps(self, rollout, train):
        return 1

    def plan(self, rollout, train, num_prompts, iteration, generator):
        return torch.full((num_prompts, rollout.group_size, 1), rollout.num_candidates - 1, dtype=torch.long)


@pytest.fixture
def registered():
    register("test_darkness", required=("gamma",), hint="any positive number")(Darkness)
    register_mode(LastCandidate)
    yield
    for table in (_FACTORIES, _REQUIRED):
        table.pop("test_darkness", None)
    MODES.pop("last_candidate", None)


def test_a_registered_reward_and_mode_run_an_iteration(registered, tiny_params):
    params = tiny_params(train__mode="last_candidate", reward__weights={"test_darkness": 1.0},
                         reward__options={"test_darkness": {"gamma": 2.0}})
    assert params.train.rectify == "exact"  # `auto` resolved to the mode's own setting
    assert "test_darkness" in available_rewards()
    steps = plan_steps(params, len(PROMPTS), 0)
    assert steps.shape == (2, 4, 1) and torch.all(steps == params.rollout.num_candidates - 1)

    engine, reward = build_engine(params), reward_from_params(params)
    batch, videos = generate(engine, PROMPTS, 0, PassCounter())
    assert torch.all(batch.steps == params.rollout.num_candidates - 1)
    expected = (1 - videos.float().mean(dim=(1, 2, 3, 4)) / 255) ** 2.0
    assert torch.allclose(reward(videos, [PROMPTS[i] for i in batch.prompt_index.tolist()]).scores, expected)

    before = [p.detach().clone() for p in engine.policy.parameters.values()]
    metrics = run_iteration(engine, PROMPTS, reward, 0)
    assert metrics["train_backward_passes"] > 0
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, engine.policy.parameters.values()))


def test_the_registries_check_what_the_new_pieces_declare(registered, tiny_params):
    with pytest.raises(ConfigError, match="rollout.num_candidates must be >= 2 for last_candidate"):
        tiny_params(train__mode="last_candidate", rollout__num_candidates=1)
    params = tiny_params(reward__weights={"test_darkness": 1.0})
    with pytest.raises(ConfigError, match=r"needs reward.options.test_darkness.gamma in params.yaml \(any positive"):
        reward_from_params(params)


def test_an_unregistered_mode_is_refused_naming_the_registered_ones(tiny_params):
    with pytest.raises(ConfigError, match="train.mode must be one of .*'flash'.*'full'.*got 'last_candidate'"):
        tiny_params(train__mode="last_candidate")


def test_the_validate_stage_reads_every_reward_declaration_without_importing_one():
    """The declarations the validate stage reads from the source (no torch) are the registry's."""
    import subprocess
    import sys

    from flash_grpo_core.pipeline.inputs import declared_rewards
    from flash_grpo_core.rewards.base import _known as reward_for
    from flash_grpo_core.rewards.base import available_rewards

    declared = declared_rewards()
    project = {name for name in available_rewards()  # not those other tests of this process registered
               if name not in _FACTORIES or _FACTORIES[name].__module__.startswith("flash_grpo_core.")}
    assert set(declared) == project
    for name in declared:
        assert reward_for(name)  # registers a task's reward, as building it in a run does
    assert {name: required for name, (required, _) in declared.items()} == {name: _REQUIRED[name][0] for name in declared}
    assert all(declared[name] == _REQUIRED[name] for name in declared if declared[name][0])  # and their hints
    code = ("import sys; from flash_grpo_core.pipeline.inputs import declared_rewards; declared_rewards(); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
