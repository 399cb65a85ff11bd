"""The paper's math as pure functions on tensors (SPEC sections 1-6).

`schedule` (sigmas), `sde` (SDE step, log-probability, noise scales, rectification coefficients),
`rectify` (the rectification weights), `steps` (iso-temporal, window and full step sets),
`advantages`, `loss` (PPO-clip, KL), `reductions` (means and stds over the global batch, all
ranks), `batch` (what a rollout keeps for training). Imports torch and nothing of the models,
diffusers, peft or the engine.
"""
