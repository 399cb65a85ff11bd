"""Flash-GRPO core: the math, models, sampler, rewards and training step shared by every stage.

Public, stable API (see docs/api.md): `schedule.flow_sigmas`, `sde.sde_step`, `sde.noise_scales`,
`sde.rectification_coefficients`. Submodules are imported lazily by their users so that light
modules (flows, configuration) do not pay for torch and diffusers.
"""
