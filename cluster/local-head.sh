#!/usr/bin/env bash
# A one-machine Ray cluster to `ray job submit` to: a head on 127.0.0.1 with the dashboard, the
# metrics endpoint and token authentication on (docs/running.md, "A Ray cluster on this machine").
#
#   cluster/local-head.sh up        # start it (also: make cluster-up)
#   eval "$(cluster/local-head.sh env)"   # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN, PATH
#   cluster/local-head.sh down      # stop this head only (also: make cluster-down)
#
# Settings (environment): DASHBOARD_PORT (8265), GCS_PORT (6379), METRICS_PORT (8080),
# DASHBOARD_AGENT_PORT (52365: the agent that runs submitted jobs), CLIENT_PORT (10001: Ray
# client). A default port that something else holds (another Ray, e.g. an embedded one that
# `make run` started) is replaced by a free one, and said so; a port you set yourself that is
# held stops `up` with the holder's pid and command. `env` prints the ports actually used.
# NUM_CPUS (logical CPUs Ray schedules; default max(cores, 4): tiny.yaml asks for 2.5 and its
# workers mostly wait on one another), RAY_TEMP_DIR (this head's own: ${TMPDIR:-/tmp}/eopd-head-<8
# hex digits of STATE_DIR>; never Ray's shared /tmp/ray, see below), VENV_BIN (<repo>/.venv/bin:
# the `ray` and the `python` the jobs run with), STATE_DIR (~/.eopd-ray/local-head: pid, ports,
# log), RAY_START_ARGS (more `ray start` flags, e.g. the agent ports when two heads share a machine).
#
# Why a temp dir of its own: Ray's job supervisor gives each job the address it reads from
# `ray_current_cluster` in the head's temp dir, which the latest `ray start --head` with that temp
# dir rewrites: with a shared one, jobs submitted here ran on another Ray. `up` on a running head
# checks again that a job submitted to it runs on it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV_BIN=${VENV_BIN:-$REPO/.venv/bin}
CORES=$(nproc)
NUM_CPUS=${NUM_CPUS:-$((CORES > 4 ? CORES : 4))}
STATE_DIR=${STATE_DIR:-$HOME/.eopd-ray/local-head}
PORTS_FILE=$STATE_DIR/ports
# Short: Ray puts unix sockets under it (at most ~107 characters with the session's name).
RAY_TEMP_DIR=${RAY_TEMP_DIR:-${TMPDIR:-/tmp}/eopd-head-$(printf %s "$STATE_DIR" | sha256sum | cut -c1-8)}
# name default: the ports of this head (a running head's are in $PORTS_FILE)
PORT_DEFAULTS="DASHBOARD_PORT:8265 GCS_PORT:6379 METRICS_PORT:8080 DASHBOARD_AGENT_PORT:52365 CLIENT_PORT:10001"

die() { echo "local-head: $*" >&2; exit 1; }

[[ -x "$VENV_BIN/ray" ]] || die "no ray in $VENV_BIN: run 'make env' first, or set VENV_BIN"

running() { [[ -f "$STATE_DIR/head.pid" ]] && kill -0 "$(cat "$STATE_DIR/head.pid")" 2>/dev/null; }

load_ports() {
    # The running head's ports win over the environment: `env` must point at OUR head.
    if running && [[ -f "$PORTS_FILE" ]]; then
        # shellcheck disable=SC1090
        source "$PORTS_FILE"
    fi
    local pair
    for pair in $PORT_DEFAULTS; do
        local name=${pair%%:*} default=${pair##*:}
        [[ -n "${!name:-}" ]] || printf -v "$name" '%s' "$default"
    done
    ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
}

port_holder() {
    # "pid N (command)" of the process listening on 127.0.0.1/0.0.0.0 port $1, or "" if free.
    "$VENV_BIN/python" - "$1" 2>/dev/null <<'PY'
import socket, sys
port = int(sys.argv[1])
with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", port))
        sys.exit(0)  # free
    except OSError:
        pass
holder = "another process"
try:
    import psutil
    for c in psutil.net_connections(kind="tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            p = psutil.Process(c.pid)
            # Ray's processes rename themselves ("ray::IDLE" padded with spaces or empty args).
            args = " ".join(a.strip() for a in p.cmdline() if a.strip()) or p.name()
            holder = f"pid {c.pid} ({args[:100]})"
            break
except Exception:
    pass
print(holder)
PY
}

free_port() {
    # Outside the kernel's ephemeral range, where another Ray's own ports come from (ports.py).
    "$VENV_BIN/python" "$REPO/eopd_ray/ports.py"
}

choose_ports() {
    # A default port that is held is replaced by a free one; a port the user set is not.
    local pair name default holder given
    for pair in $PORT_DEFAULTS; do
        name=${pair%%:*} default=${pair##*:}
        given=${!name:-}
        printf -v "$name" '%s' "${given:-$default}"
        holder=$(port_holder "${!name}")
        [[ -z "$holder" ]] && continue
        if [[ -n "$given" ]]; then
            die "port ${!name} ($name) is held by $holder: stop that, or set $name to a free port"
        fi
        printf -v "$name" '%s' "$(free_port)"
        echo "local-head: default port $default ($name) is held by $holder; using ${!name}"
    done
    ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
}

token() {
    # `ray get-auth-token` writes a blank line (and, generating, two log lines) to stderr: shown
    # only when it fails.
    local err rc=0
    err=$(RAY_AUTH_MODE=token "$VENV_BIN/ray" get-auth-token "$@" 2>&1 >&3) || rc=$?
    ((rc == 0)) || { echo "$err" >&2; return "$rc"; }
} 3>&1

print_env() {
    load_ports
    # The job's `python` is the first one on the head's PATH: the head starts with VENV_BIN first.
    echo "export PATH=\"$VENV_BIN:\$PATH\""
    echo "export RAY_ADDRESS=$ADDRESS"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN=$(token)"
}

listening() {
    # The dashboard answers (any HTTP answer: with token auth on, /api/version says 401 without
    # the token) and the head's agent, which runs submitted jobs, listens.
    "$VENV_BIN/python" - "$ADDRESS/api/version" "$DASHBOARD_AGENT_PORT" 2>/dev/null <<'PY'
import socket, sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=2).close()
PY
}

runs_jobs() {
    # Ready means: THIS head runs a job. A trivial job, submitted with the token, must succeed
    # and report this head's GCS port (an agent of another Ray on a shared port would answer
    # "No available agent", or run the job somewhere else).
    local out
    out=$(PATH="$VENV_BIN:$PATH" RAY_ADDRESS=$ADDRESS RAY_AUTH_MODE=token \
        RAY_AUTH_TOKEN=$(token) \
        timeout 120 "$VENV_BIN/ray" job submit --submission-id "local-head-ready-$(date +%s%N)" \
        -- python -c 'import os; print("gcs-address", os.environ.get("RAY_ADDRESS"))' 2>&1) \
        || { echo "$out" | tail -n 5 >&2; return 1; }
    grep -q "gcs-address 127.0.0.1:$GCS_PORT" <<<"$out" || {
        echo "local-head: a job submitted to this head was given another Ray ($(grep -m1 \
            '^gcs-address' <<<"$out")), not 127.0.0.1:$GCS_PORT: another \`ray start --head\`" \
            "uses this head's temp dir $RAY_TEMP_DIR" >&2
        return 1
    }
}

up() {
    if running; then
        load_ports
        # Running is not enough: its agent may have died, or its temp dir been taken over.
        runs_jobs || die "the head (pid $(cat "$STATE_DIR/head.pid"), $ADDRESS) runs but does" \
            "not run jobs on itself (above); restart it: $0 down && $0 up"
        echo "local-head: already running (pid $(cat "$STATE_DIR/head.pid")) at $ADDRESS," \
            "temp dir $RAY_TEMP_DIR; a test job ran on it"
        return
    fi
    mkdir -p "$STATE_DIR"
    choose_ports
    {
        for pair in $PORT_DEFAULTS; do
            name=${pair%%:*}
            echo "$name=${!name}"
        done
        echo "RAY_TEMP_DIR=$RAY_TEMP_DIR"
    } >"$PORTS_FILE"
    # The token lives in ~/.ray/auth_token; --generate makes one on the first run.
    token --generate >/dev/null
    # --block keeps every Ray process in one process group that `down` can stop, without
    # `ray stop` (which would stop every Ray cluster of this user on the machine).
    # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` gives a driver this long after SIGTERM before
    # SIGKILL (Ray's default: 3 s); above the driver's run.stop_grace_s (25 s) it can checkpoint.
    PATH="$VENV_BIN:$PATH" RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
        RAY_JOB_STOP_WAIT_TIME_S=${RAY_JOB_STOP_WAIT_TIME_S:-30} \
        setsid "$VENV_BIN/ray" start --head --block \
        --node-ip-address=127.0.0.1 \
        --port="$GCS_PORT" \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --metrics-export-port="$METRICS_PORT" \
        --dashboard-agent-listen-port="$DASHBOARD_AGENT_PORT" \
        --ray-client-server-port="$CLIENT_PORT" \
        --num-cpus="$NUM_CPUS" \
        --temp-dir="$RAY_TEMP_DIR" \
        ${RAY_START_ARGS:-} \
        >"$STATE_DIR/head.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/head.pid"
    local waited=0
    while ((waited < 120)); do
        if listening; then
            if runs_jobs; then
                echo "local-head: up at $ADDRESS (dashboard), metrics on 127.0.0.1:$METRICS_PORT," \
                    "$NUM_CPUS CPUs, token auth on, a test job ran; log: $STATE_DIR/head.log," \
                    "Ray's temp dir (session logs): $RAY_TEMP_DIR"
                echo "local-head: now run: eval \"\$(cluster/local-head.sh env)\""
                return
            fi
            break
        fi
        running || break
        sleep 1
        waited=$((waited + 1))
    done
    tail -n 30 "$STATE_DIR/head.log" >&2
    local agent_log
    agent_log=$(ls "$RAY_TEMP_DIR"/session_latest/logs/dashboard_agent*.log 2>/dev/null | head -n 1)
    [[ -n "$agent_log" ]] && grep -i "failed to bind\|address already in use" "$agent_log" >&2
    down
    die "the head did not come up able to run a job (log above; ports in $PORTS_FILE)"
}

down() {
    [[ -f "$STATE_DIR/head.pid" ]] || { echo "local-head: not running"; return; }
    local pid
    pid=$(cat "$STATE_DIR/head.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    # The raylet drains for up to 30 s after SIGTERM, for nothing: no job of ours runs once
    # `down` is called. Give the dashboard and the agents 3 s to flush, then end the group.
    for _ in $(seq 15); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$STATE_DIR/head.pid" "$PORTS_FILE"
    echo "local-head: stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) print_env ;;
    *) die "usage: $0 up|env|down" ;;
esac
