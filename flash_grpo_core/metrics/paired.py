"""The trained-minus-base difference of a per-video metric on the same noise, with its uncertainty.

Every evaluated checkpoint samples the same videos (prompt i, sample s, noise fixed by `eval.seed`),
so the difference is paired video by video. Its 95% interval is a percentile bootstrap that
resamples the S samples within each of the P prompts (the held-out prompts are a fixed set, not a
draw: the interval is about the noise, conditional on them); the per-prompt spread is the standard
deviation of the P per-prompt mean differences. Not from the paper, which reports no intervals.
"""

from __future__ import annotations

from collections.abc import Sequence


def paired_delta(base: Sequence[float], trained: Sequence[float], prompts: int, resamples: int = 4000,
                 seed: int = 0) -> dict:
    """{delta, delta_low, delta_high, prompt_std, prompts_improved, videos} for per-video values laid
    out sample-major (video s * P + i is sample s of prompt i), as the eval_checkpoint stage writes them."""
    import numpy as np

    base_values, trained_values = np.asarray(base, dtype=float), np.asarray(trained, dtype=float)
    if base_values.shape != trained_values.shape or prompts < 1 or base_values.size % prompts:
        raise ValueError(f"paired values need equal lengths that {prompts} prompts divide, got "
                         f"{base_values.size} and {trained_values.size}")
    difference = (trained_values - base_values).reshape(-1, prompts)  # [S, P]
    samples = difference.shape[0]
    generator = np.random.default_rng(seed)
    picks = generator.integers(0, samples, size=(resamples, samples, prompts))  # [R, S, P]
    means = np.take_along_axis(difference[None].repeat(resamples, 0), picks, axis=1).mean(axis=(1, 2))  # [R]
    low, high = np.quantile(means, [0.025, 0.975])
    per_prompt = difference.mean(axis=0)  # [P]
    return {"delta": float(difference.mean()), "delta_low": float(low), "delta_high": float(high),
            "prompt_std": float(per_prompt.std(ddof=1)) if prompts > 1 else 0.0,
            "prompts_improved": int((per_prompt > 0).sum()), "prompts": prompts, "videos": int(difference.size)}
