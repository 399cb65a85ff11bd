#!/usr/bin/env bash
# Rehearse the several-node path on one host: start NODES copies of the command that follows, as
# `srun --ntasks-per-node=1` starts one per node, and stop the others when one fails (srun's
# --kill-on-bad-exit). Each copy is a torchrun agent that joins the same c10d rendezvous, so the
# stage runs exactly as it would on NODES nodes, over the loopback network and without GPUs:
#
#   FLASH_GRPO_NNODES=2 FLASH_GRPO_NODE_LAUNCHER="scripts/cluster/local_nodes.sh 2" \
#   FLASH_GRPO_RDZV_ENDPOINT=127.0.0.1:29400 dvc repro
#
# On a CPU every copy's ranks use gloo; on one GPU host the copies would share its GPUs (each
# agent numbers its ranks' LOCAL_RANK from 0), so use it to check a set-up, not to train.
set -u
if (($# < 2)) || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: local_nodes.sh NODES COMMAND..." >&2
  exit 2
fi
nodes=$1
shift
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap 'stop; wait; exit 143' TERM INT
for ((node = 0; node < nodes; node++)); do
  "$@" &
  pids+=($!)
done
worst=0
for ((node = 0; node < nodes; node++)); do
  wait -n
  code=$?
  if ((code != 0 && worst == 0)); then
    worst=$code
    stop
  fi
done
exit "$worst"
