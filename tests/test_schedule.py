import math

import pytest
import torch

from flash_grpo_core.method.schedule import flow_sigmas, timesteps


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def test_authors_schedule_hand_worked():
    # N = 2: s = 1 - linspace(1, 0.001, 3) = [0, 0.4995, 0.999]; shifted (shift 3) and reversed:
    # shift(0.999) = 2.997 / 2.998, shift(0.4995) = 1.4985 / 1.999, then the appended 0.
    sigmas = flow_sigmas(2, 3.0, "authors")
    assert sigmas.tolist() == pytest.approx([2.997 / 2.998, 1.4985 / 1.999, 0.0], abs=1e-12)


@pytest.mark.parametrize("steps,shift", [(20, 3.0), (50, 5.0), (7, 1.0)])
def test_authors_schedule_follows_formula(steps, shift):
    sigmas = flow_sigmas(steps, shift, "authors")
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    for i in range(steps):  # sigma_i = shift(1 - linspace(1, 1/1000, N+1)[N - i])
        s = 1 - (1 + (1 / 1000 - 1) * (steps - i) / steps)
        assert sigmas[i].item() == pytest.approx(_shift(s, shift), abs=1e-12)
    assert torch.all(sigmas[1:] < sigmas[:-1])


@pytest.mark.parametrize("steps,shift", [(20, 3.0), (50, 5.0), (10, 1.0), (4, 8.0)])
def test_diffusers_schedule_equals_scheduler(steps, shift):
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(steps)
    ours = flow_sigmas(steps, shift, "diffusers")
    assert torch.allclose(ours.float(), scheduler.sigmas.float(), atol=1e-7, rtol=0)
    # the scheduler truncates 1000 * sigma to int64, and so do we: the transformer gets the same integers
    assert timesteps(ours).dtype == torch.int64 and torch.equal(timesteps(ours), scheduler.timesteps)


def test_variants_differ_slightly():
    gap = (flow_sigmas(20, 3.0, "authors") - flow_sigmas(20, 3.0, "diffusers")).abs().max().item()
    assert 0 < gap < 0.004


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        flow_sigmas(20, 3.0, "karras")
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0, 3.0)
    # 1000 * 2.997 / 2.998 = 999.67, truncated: the authors' first timestep key '999' (value_dict)
    assert timesteps(flow_sigmas(20, 3.0))[0].item() == 999 == math.floor(1000 * 2.997 / 2.998)
