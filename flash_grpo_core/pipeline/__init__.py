"""What the staged pipeline needs above the engine: the checks of a run's inputs (`inputs`, the
validate stage's) and before any GPU work (`preflight`, sized by `plan`), the lock's outputs
(`lock_outputs`), scratch workspaces (`workspace`), checkpoint pruning (`prune`), the iteration
count in params.yaml (`iterations`), the HTML report (`report`), live tracking (`tracking`), the
health guards (`health`) and a run's table read from its files (`watch`). Stages, flows and
benchmarks call these; nothing in the core below imports them. `prune`, `iterations` and `watch`
are also commands: `python -m flash_grpo_core.pipeline.prune`, `python -m
flash_grpo_core.pipeline.iterations N`, `python -m flash_grpo_core.pipeline.watch`.
"""
