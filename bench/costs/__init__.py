"""What the pipeline costs, each benchmark a module run from the repository root:

    python -m bench.costs.gpu_step            # rollout and update against raw transformer calls
    python -m bench.costs.iteration_cost      # one iteration per training mode
    python -m bench.costs.lora_cost           # where a LoRA update's time goes
    python -m bench.costs.rollout_cost        # the cheaper flash rollouts: cost and accuracy
    python -m bench.costs.pipeline_overhead   # per stage: model compute against everything else
    python -m bench.costs.process_scaling     # the GPU stages on 1 against 2 processes
    python -m bench.costs.dvc_scaling         # DVC's bookkeeping over a long run
    bash bench/costs/gpu_check.sh             # every GPU check in one run

Each module's docstring says what it measures and which record it writes under bench/results/.
"""
