"""Benchmarks of the pipeline, in three families, each run as a module from the repository root.

- `bench.faults`: fault injection on a scratch copy of the tiny preset (kill points, corruptions, bad
  inputs, bad edits through `dvc repro`): `python -m bench.faults [--small]`.
- `bench.costs`: what a step, an iteration, a stage and the DVC bookkeeping cost, on CPU or one GPU:
  `python -m bench.costs.NAME` (gpu_step, iteration_cost, lora_cost, rollout_cost,
  pipeline_overhead, process_scaling, dvc_scaling); bench/costs/gpu_check.sh runs the GPU checks.
- `bench.alignment`: GRPO variants trained to equal compute on the toy task from the shipped base
  (`python -m bench.alignment`), and where a toy base fails (`python -m bench.alignment.toy_probe`).

Each benchmark prints its figures and records them under bench/results/ as `<name>.json` and
`<name>.md`, written by one function, `bench.results_io.write_results`. Also here and not code:
bench/results/ (the recorded results, kept as they were measured) and bench/toy/ (the frozen DVC
stage that pre-trained the toy base, and the base itself, bench/toy/base/).
"""
