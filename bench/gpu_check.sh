#!/usr/bin/env bash
# Every GPU check in one run: the CUDA tests, where a LoRA update's time goes at Wan 2.1 1.3B's full
# size, then the iteration-cost benchmark on 1.3B's real architecture (random weights). Results go
# to $OUT (default bench/results/gpu); each benchmark has its own time limit.
# Needs the project's dependencies importable (PYTHONPATH or an installed environment).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
# tests/test_metrics.py: MUSIQ (imaging_quality) runs where pyiqa imports with a matching torchvision
"$PY" -m pytest -q -rA -s tests/test_gpu.py tests/test_sde.py tests/test_iteration.py tests/test_metrics.py \
  tests/test_fast_rollout.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt"
# the question first (full weights against LoRA with and without peft's casts, checkpointing on), then the rest
timeout "${LORA_TIMEOUT:-180}" "$PY" bench/lora_cost.py --arch wan1_3b --height 480 --width 832 --frames 81 \
  --ways full lora lora-compute-input --checkpointing on --repeats 2 --tag core --out-dir "$OUT" 2>&1 | tee "$OUT/lora_cost.txt"
timeout "${LORA_REST_TIMEOUT:-240}" "$PY" bench/lora_cost.py --arch wan1_3b --height 480 --width 832 --frames 81 \
  --ways full lora lora-compute-input lora-base-dtype --checkpointing 2 off --repeats 2 --out-dir "$OUT" 2>&1 \
  | tee -a "$OUT/lora_cost.txt"
timeout "${BENCH_TIMEOUT:-420}" "$PY" bench/iteration_cost.py --arch wan1_3b --height 240 --width 416 --frames 17 \
  --prompts 2 --group 4 --micro-batch 4 --repeats 2 --tag wan1_3b-cuda 2>&1 | tee "$OUT/bench.txt"
cp bench/results/iteration_cost-wan1_3b-cuda.* "$OUT/" 2>/dev/null || true
