"""Tasks: each subpackage is one task (its data, reward, model, base), registered through the same
registries a user's own task uses (`config.tasks.register_task`, `rewards.register`) when imported.
Built-in tasks are plugins too (pyproject.toml, group `flash_grpo.plugins`): the registries load
them on demand, and nothing below this package imports one. See docs/architecture.md.
"""
