#!/usr/bin/env bash
# A one-machine Ray cluster to `ray job submit` to: a head on 127.0.0.1 with the dashboard, the
# metrics endpoint and token authentication on (docs/running.md, "A Ray cluster on this machine").
#
#   cluster/local-head.sh up        # start it (also: make cluster-up)
#   eval "$(cluster/local-head.sh env)"   # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN, PATH
#   cluster/local-head.sh down      # stop this head only (also: make cluster-down)
#
# Settings (environment): DASHBOARD_PORT (8265), GCS_PORT (6379), METRICS_PORT (8080),
# DASHBOARD_AGENT_PORT (52365: the agent that runs submitted jobs),
# NUM_CPUS (logical CPUs Ray schedules; default max(cores, 4): tiny.yaml asks for 2.5 and its
# workers mostly wait on one another), RAY_TEMP_DIR (/tmp/ray), VENV_BIN (<repo>/.venv/bin: the
# `ray` and the `python` the jobs run with), STATE_DIR (~/.eopd-ray/local-head: pid and log),
# RAY_START_ARGS (more `ray start` flags, e.g. the agent ports when two heads share a machine).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV_BIN=${VENV_BIN:-$REPO/.venv/bin}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
GCS_PORT=${GCS_PORT:-6379}
METRICS_PORT=${METRICS_PORT:-8080}
DASHBOARD_AGENT_PORT=${DASHBOARD_AGENT_PORT:-52365}
CORES=$(nproc)
NUM_CPUS=${NUM_CPUS:-$((CORES > 4 ? CORES : 4))}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/ray}
STATE_DIR=${STATE_DIR:-$HOME/.eopd-ray/local-head}
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"

die() { echo "local-head: $*" >&2; exit 1; }

[[ -x "$VENV_BIN/ray" ]] || die "no ray in $VENV_BIN: run 'make env' first, or set VENV_BIN"

print_env() {
    # The job's `python` is the first one on the head's PATH: the head starts with VENV_BIN first.
    echo "export PATH=\"$VENV_BIN:\$PATH\""
    echo "export RAY_ADDRESS=$ADDRESS"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN=$(RAY_AUTH_MODE=token "$VENV_BIN/ray" get-auth-token)"
}

ready() {
    # The dashboard answers (any HTTP answer: with token auth on, /api/version says 401 without
    # the token) and the head's agent, which runs submitted jobs, listens: until it does,
    # `ray job submit` fails with "No available agent to submit job".
    "$VENV_BIN/python" - "$ADDRESS/api/version" "$DASHBOARD_AGENT_PORT" 2>/dev/null <<'PY'
import socket, sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=2).close()
PY
}

up() {
    if [[ -f "$STATE_DIR/head.pid" ]] && kill -0 "$(cat "$STATE_DIR/head.pid")" 2>/dev/null; then
        echo "local-head: already running (pid $(cat "$STATE_DIR/head.pid")) at $ADDRESS"
        return
    fi
    mkdir -p "$STATE_DIR"
    # The token lives in ~/.ray/auth_token; --generate makes one on the first run.
    RAY_AUTH_MODE=token "$VENV_BIN/ray" get-auth-token --generate >/dev/null
    # --block keeps every Ray process in one process group that `down` can stop, without
    # `ray stop` (which would stop every Ray cluster of this user on the machine).
    PATH="$VENV_BIN:$PATH" RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
        setsid "$VENV_BIN/ray" start --head --block \
        --node-ip-address=127.0.0.1 \
        --port="$GCS_PORT" \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --metrics-export-port="$METRICS_PORT" \
        --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT" \
        --num-cpus="$NUM_CPUS" \
        --temp-dir="$RAY_TEMP_DIR" \
        ${RAY_START_ARGS:-} \
        >"$STATE_DIR/head.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/head.pid"
    for _ in $(seq 120); do
        if ready; then
            echo "local-head: up at $ADDRESS (dashboard), metrics on 127.0.0.1:$METRICS_PORT," \
                "$NUM_CPUS CPUs, token auth on; log: $STATE_DIR/head.log"
            echo "local-head: now run: eval \"\$(cluster/local-head.sh env)\""
            return
        fi
        kill -0 "$(cat "$STATE_DIR/head.pid")" 2>/dev/null || break
        sleep 1
    done
    tail -n 30 "$STATE_DIR/head.log" >&2
    down
    die "the head did not come up (log above)"
}

down() {
    [[ -f "$STATE_DIR/head.pid" ]] || { echo "local-head: not running"; return; }
    local pid
    pid=$(cat "$STATE_DIR/head.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    # Ray drains for up to 30 s after SIGTERM; nothing of ours runs once the jobs are done.
    for _ in $(seq 10); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$STATE_DIR/head.pid"
    echo "local-head: stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) print_env ;;
    *) die "usage: $0 up|env|down" ;;
esac
