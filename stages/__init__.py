"""The DVC pipeline's stages, one module each, run as `python -m stages.<name>` by dvc.yaml; what runs
them (argument parsing, exit codes, the launcher, the watchdog, the warm stage runner) is
`stages.runtime`. dvc.yaml declares the stages and their order once
(`flash_grpo_core.pipeline.stage_order` reads it). This package imports nothing: every stage
process imports it first.
"""
