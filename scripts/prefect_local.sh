#!/usr/bin/env bash
# A local Prefect set-up of the pipeline in one command (docs/prefect.md):
#   bash scripts/prefect_local.sh                        # server, pool, deployments, worker; run train-loop/tiny
#   bash scripts/prefect_local.sh --run wan14b           # ... and run another deployment
#   bash scripts/prefect_local.sh -- -p iterations=1     # arguments after -- go to `prefect deployment run`
#   bash scripts/prefect_local.sh --serve                # no run: keep server and worker up until Ctrl-C
#   bash scripts/prefect_local.sh --port 4200            # a fixed port (default: a free one)
# The server listens on 127.0.0.1 only, keeps its SQLite database in .prefect/ (PREFECT_HOME;
# ignored by git), analytics off. Everything started here is stopped on exit, error or Ctrl-C; a
# run stopped that way is marked crashed (so it frees its deployment's slot) and can be retried.
set -euo pipefail
set -m  # background jobs get their own process group: stop them with their children
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DEPLOYMENT=tiny SERVE=0 PORT=${PREFECT_PORT:-}
RUN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --run) DEPLOYMENT=$2; shift 2 ;;
    --serve) SERVE=1; shift ;;
    --port) PORT=$2; shift 2 ;;
    --) shift; RUN_ARGS=("$@"); break ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PYTHON")
[ -x "$BIN/prefect" ] || { echo "no prefect beside $PYTHON: run scripts/setup.sh first" >&2; exit 2; }
export PATH="$BIN:$PATH"
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
export FLASH_GRPO_PROJECT=$ROOT  # where the worker runs the flow (prefect.yaml's pull step)
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
mkdir -p "$PREFECT_HOME"
RUN_RECORD=$PREFECT_HOME/last-run.txt
rm -f "$RUN_RECORD"

SERVER='' WORKER='' WATCHER=''
descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done
}
stop_process() {  # escalate: a worker may ignore the first signals; then any descendant left behind
  local pid=$1 signal left
  [ -n "$pid" ] || return 0
  left=$(descendants "$pid")  # a flow run sits in a session of its own
  for signal in TERM INT INT KILL; do
    kill -0 "$pid" 2>/dev/null || break
    kill -"$signal" -- -"$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  done
  for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
}
run_id() { if [ -f "$RUN_RECORD" ]; then sed -n 's/.*UUID: *//p' "$RUN_RECORD" | head -n 1; fi; }
mark_crashed() {  # an unfinished run would keep its deployment's concurrency slot
  local id
  id=$(run_id)
  [ -n "$id" ] && [ -n "$SERVER" ] || return 0
  "$PYTHON" - "$id" <<'EOF' || true
import os, sys, httpx
api, run = os.environ["PREFECT_API_URL"], sys.argv[1]
state = httpx.get(f"{api}/flow_runs/{run}", timeout=5).json()["state"]
if state["type"] not in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
    httpx.post(f"{api}/flow_runs/{run}/set_state", timeout=5, json={"force": True, "state": {
        "type": "CRASHED", "name": "Crashed", "message": "stopped by scripts/prefect_local.sh"}})
    print(f"run {run} marked crashed; resume it: prefect flow-run retry {run}", file=sys.stderr)
EOF
}
stop() {
  trap - EXIT INT TERM
  set +e  # clean up everything, whatever fails
  stop_process "$WATCHER"
  stop_process "$WORKER"
  mark_crashed
  stop_process "$SERVER"
}
trap stop EXIT
trap 'exit 130' INT TERM

echo "Prefect server on $PREFECT_API_URL (log: $PREFECT_HOME/server.log)"
prefect server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 180); do
  "$PYTHON" -c "import httpx, sys; sys.exit(httpx.get('$PREFECT_API_URL/health', timeout=2).status_code != 200)" \
    2>/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { tail -20 "$PREFECT_HOME/server.log" >&2; exit 1; }
  sleep 0.5
done

prefect work-pool inspect flash-grpo >/dev/null 2>&1 || prefect work-pool create flash-grpo --type process
prefect --no-prompt deploy --all
echo "Worker of pool flash-grpo (log: $PREFECT_HOME/worker.log)"
prefect worker start --pool flash-grpo --limit 1 >"$PREFECT_HOME/worker.log" 2>&1 &
WORKER=$!

if [ "$SERVE" = 1 ]; then
  echo "Serving; in another shell: PREFECT_API_URL=$PREFECT_API_URL prefect deployment run train-loop/tiny --watch"
  echo "Dashboard: http://127.0.0.1:$PORT  (Ctrl-C stops server and worker)"
  wait "$SERVER"
else
  # in the background, so that Ctrl-C reaches this script's trap at once
  prefect deployment run "train-loop/$DEPLOYMENT" --watch ${RUN_ARGS[@]+"${RUN_ARGS[@]}"} \
    > >(tee "$RUN_RECORD") 2>&1 &
  WATCHER=$!
  status=0
  wait "$WATCHER" || status=$?
  if [ "$status" != 0 ] && [ -n "$(run_id)" ]; then  # say why, before the server goes away
    "$PYTHON" -c "import httpx; state = httpx.get('$PREFECT_API_URL/flow_runs/$(run_id)').json()['state'];
print(state['name'] + ':', state['message'])" >&2
  fi
  echo "Logs of this run later: bash $0 --serve, then prefect flow-run logs $(run_id)"
  exit "$status"
fi
