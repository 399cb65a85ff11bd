"""What the staged pipeline needs above the engine: the checks of a run's inputs (`inputs`, the
validate stage's) and before any GPU work (`preflight`, sized by `plan`), the lock's outputs
(`lock_outputs`), scratch workspaces (`workspace`), checkpoint pruning (`prune`), the iteration
count in params.yaml (`iterations`), the HTML report (`report`) and live tracking (`tracking`).
Stages, flows and benchmarks call these; nothing in the core below imports them. `prune` and `iterations` are also commands:
`python -m flash_grpo_core.pipeline.prune`, `python -m flash_grpo_core.pipeline.iterations N`.
"""
