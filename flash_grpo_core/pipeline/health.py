"""Health guards of a training run: what the update stage checks once an iteration's numbers are in,
against the run's history (the checkpoint's per-iteration rows), as `health:` in params.yaml sets.

- gradient norm far above its running median (a spike, which in GRPO runs tends to come before a
  reward collapse);
- the importance ratio drifting from 1 on the first minibatch: its weights are those that sampled
  the rollout, so the recomputed log-probabilities must equal the stored ones (a bf16 or
  nondeterminism drift shows here first);
- the training reward below its running mean by `reward_drop` running stds for
  `reward_drop_iterations` iterations in a row, the mean and std of the (at least 5) iterations
  before that streak (a collapse, or a reward being hacked away);
- every group (or `equal_groups` of them) with equal rewards: no advantage, no learning signal.
Each fires a warning (a line on stderr, and in the iteration's metrics) or, set to `stop`, a
HealthStop: the stage exits 2 with one line naming the iteration and the guard. Torch-free.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


class HealthStop(RuntimeError):
    """A guard set to `stop` fired; the message names the iteration, what fired and the setting."""


@dataclass(frozen=True)
class Finding:
    guard: str  # the health key that set its action
    message: str
    stop: bool


REWARD_BASELINE = 5  # iterations before the streak that the reward's band needs (a 2-point std is noise)


def _window(history: list[dict], key: str, size: int) -> list[float]:
    return [float(row[key]) for row in history[-size:] if isinstance(row.get(key), (int, float))]


def _grad_norm(row: dict, history: list[dict], health) -> str | None:
    past = [value for value in _window(history, "grad_norm", health.window) if value > 0]
    if len(past) < 2 or not row.get("grad_norm"):
        return None
    median = statistics.median(past)
    if row["grad_norm"] <= health.grad_norm_spike * median:
        return None
    return (f"gradient norm {row['grad_norm']:.4g} is {row['grad_norm'] / median:.1f}x its running median "
            f"{median:.4g} (health.grad_norm_spike {health.grad_norm_spike:g})")


def _ratio(row: dict, history: list[dict], health) -> str | None:
    drift = row.get("first_ratio_deviation")
    if drift is None or drift <= health.ratio_drift:
        return None
    return (f"the first minibatch's importance ratios are up to {drift:.4g} from 1 under the weights that sampled "
            f"them (health.ratio_drift {health.ratio_drift:g}): the recomputed log-probabilities drift from "
            f"the rollout's")


def _reward(row: dict, history: list[dict], health) -> str | None:
    """The last rewards (this one included, at least `reward_drop_iterations`) all below the band of
    the iterations before them: a collapse is not absorbed into its own baseline."""
    rewards = [float(r["reward_mean"]) for r in (*history, row)]
    highest = -math.inf  # the highest reward from `start` on: the streak is low when it is under the floor
    for start in range(len(rewards) - 1, REWARD_BASELINE - 1, -1):
        highest = max(highest, rewards[start])
        if len(rewards) - start < health.reward_drop_iterations:
            continue
        baseline = rewards[max(start - health.window, 0):start]
        mean = sum(baseline) / len(baseline)
        floor = mean - health.reward_drop * math.sqrt(sum((r - mean) ** 2 for r in baseline) / len(baseline))
        if highest < floor:
            return (f"the mean reward {row['reward_mean']:.4g} has been below {floor:.4g} ({health.reward_drop:g} "
                    f"stds under the running mean {mean:.4g} before) for {len(rewards) - start} iterations in a "
                    f"row (health.reward_drop, reward_drop_iterations)")
    return None


def _equal_groups(row: dict, history: list[dict], health) -> str | None:
    fraction = row.get("equal_groups_fraction")
    if fraction is None or fraction < health.equal_groups:
        return None
    return (f"{fraction:.0%} of the groups have equal rewards, so no advantage and no learning signal "
            f"(health.equal_groups {health.equal_groups:g})")


GUARDS = {"grad_norm": _grad_norm, "ratio": _ratio, "reward": _reward, "equal_groups_action": _equal_groups}


def check_health(row: dict, history: list[dict], health) -> list[Finding]:
    """The guards that fire on this iteration's `row` given the earlier rows, per `health`'s actions."""
    findings = []
    for key, guard in GUARDS.items():
        action = getattr(health, key)
        message = None if action == "off" else guard(row, history, health)
        if message is not None:
            findings.append(Finding(key, message, action == "stop"))
    return findings


def act_on(findings: list[Finding], iteration: int, warn) -> list[str]:
    """Warn of each finding with `warn(line)`; raise HealthStop for the first set to stop. Returns
    the warnings' lines (kept in the iteration's metrics)."""
    for finding in findings:
        if finding.stop:
            raise HealthStop(f"iteration {iteration}: {finding.message}; stopped (health.{finding.guard}: stop; "
                             f"set it to warn or off to go on)")
    lines = [f"iteration {iteration}: {finding.message}" for finding in findings]
    for line in lines:
        warn(line)
    return lines
