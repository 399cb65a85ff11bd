#!/usr/bin/env bash
# Create .venv and install the project with its test extras.
# CPU (default): installs torch 2.13.0 first, so no CUDA build is pulled in.
# GPU: TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
#      (or install your CUDA build of torch into .venv yourself first; this script keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then
    .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX"
  else
    .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
.venv/bin/pip install -q -e ".[test,semantic,ocr,brisque]"
# Headless Chromium renders the evaluation report in the tests (skipped without it). As root with
# apt, install Debian's package unless FLASH_GRPO_NO_APT=1.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "${FLASH_GRPO_NO_APT:-}" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the report's browser test will be skipped" >&2
fi
