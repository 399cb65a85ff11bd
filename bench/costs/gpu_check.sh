#!/usr/bin/env bash
# Every GPU check in one run whose step limits add up to 10 minutes (90 + 150 + 240 + 2 x 60 s), the
# most wanted first, each step under its own limit so that a slow one cannot eat the others:
#   tests      the CUDA tests (tests/test_gpu.py, the GPU case of tests/test_fast_rollout.py) and
#              the modules whose dtype paths they share
#   lora       where a LoRA update's time goes at Wan 2.1 1.3B's full size (480x832x81): the
#              full-weight pass, peft's LoRA path and model.lora_compute: input, checkpointing on
#   step       the pipeline's rollout and update against raw transformer calls at that size
#              (bench/costs/gpu_step.py; G = 2, one timed repeat)
#   iteration  one flash iteration, and one with the cheaper rollout (head 1 + tail 3), on 1.3B's
#              architecture at 240x416x17 (bench/costs/iteration_cost.py)
# STEPS="lora step" reruns a subset. SMOKE=1 runs the same steps at the tiny shape on a CPU: it
# checks this script, it measures nothing of interest. Results go to $OUT (default
# bench/results/gpu): device.txt, log.txt (everything printed) and each benchmark's JSON record,
# six files in all. Needs the project's dependencies importable
# (PYTHONPATH or an environment).
set -uo pipefail
cd "$(dirname "$0")/../.."  # the repository root: each benchmark runs as `python -m bench.costs.NAME`
OUT=${OUT:-bench/results/gpu}
STEPS=${STEPS:-tests lora step iteration}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [[ ${SMOKE:-0} == 1 ]]; then
  FULL=() SMALL=() TESTS=(tests/test_gpu.py)
else
  FULL=(--arch wan1_3b --height 480 --width 832 --frames 81)
  SMALL=(--arch wan1_3b --height 240 --width 416 --frames 17)
  TESTS=(tests/test_gpu.py tests/test_sde.py tests/test_iteration.py tests/test_metrics.py tests/test_fast_rollout.py)
fi
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

if [[ ${SMOKE:-0} == 1 ]]; then  # the versions' import costs seconds and says nothing here
  echo "smoke run on a CPU" | tee "$OUT/device.txt"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  "$PY" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
fi
if wanted tests; then  # tests/test_metrics.py: MUSIQ (imaging_quality) runs where pyiqa imports with a matching torchvision
  timeout "${TESTS_TIMEOUT:-90}" "$PY" -m pytest -q -rA -s "${TESTS[@]}" -p no:cacheprovider 2>&1 | tee -a "$OUT/log.txt"
fi
if wanted lora; then
  timeout "${LORA_TIMEOUT:-150}" "$PY" -m bench.costs.lora_cost "${FULL[@]}" --ways full lora lora-compute-input \
    --checkpointing on --repeats 2 --tag core --out-dir "$OUT" 2>&1 | tee -a "$OUT/log.txt"
fi
if wanted step; then
  timeout "${STEP_TIMEOUT:-240}" "$PY" -m bench.costs.gpu_step "${FULL[@]}" --group 2 --repeats 1 --parts rollout update \
    --out-dir "$OUT" 2>&1 | tee -a "$OUT/log.txt"
fi
if wanted iteration; then
  for options in "" "--head-steps 1 --tail-steps 3"; do
    tag="check-flash${options:+-fast3}"
    # shellcheck disable=SC2086  # the options are words
    timeout "${ITERATION_TIMEOUT:-60}" "$PY" -m bench.costs.iteration_cost "${SMALL[@]}" --prompts 2 --group 4 --micro-batch 4 \
      --repeats 1 --modes flash $options --tag "$tag" --out-dir "$OUT" 2>&1 | tee -a "$OUT/log.txt"
  done
fi
rm -f "$OUT"/*.md  # the tables are in log.txt
