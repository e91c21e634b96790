#!/usr/bin/env bash
# Sandboxes started per second across three runners, and the time to detect a dead runner.
#
# Starts `cellar server --no-embedded-runner` on a free loopback port (temporary data directory,
# file:// store) and three `cellar runner` processes on loopback (each with its own data
# directory, token in CELLAR_RUNNER_TOKEN), then runs bench/runners.py:
#   1. N sandboxes (default 60) created by C concurrent clients (default 6), timed from the first
#      request to the last `started`: `runners_start ... per_second=... spread=r1:..,r2:..,r3:..`;
#   2. K times (default 3): a sandbox pinned on r3, `kill -9` of r3, the time until that sandbox
#      reads `error` (runner lost) through the API: `runner_detect_ms timeout_ms=... ms=...`; r3
#      is then restarted and reconciles. The server's own log line (`no heartbeat for X ms`) is
#      printed too.
# Builds nothing. Run as root (bubblewrap sandboxes). Deletes every sandbox and stops every
# process of the run on exit.
#
# Usage: bench/runners.sh [CELLAR_BIN]
# Environment:
#   CELLAR_BIN              the cellar binary (default: target/release/cellar of this repository)
#   RUNNERS_SANDBOXES       sandboxes of the start-rate run (default 60)
#   RUNNERS_CONCURRENCY     concurrent clients of the start-rate run (default 6)
#   RUNNERS_DETECT_RUNS     dead-runner detections (default 3)
#   RUNNERS_TIMEOUT         the server's --runner-timeout (default 10s)
#   RUNNERS_KEEP            1 to keep the data directories and logs
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
for arg in "$@"; do
    case $arg in
        -h | --help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "runners.sh: unknown option $arg" >&2; exit 2 ;;
        *) CELLAR_BIN=$arg ;;
    esac
done
CELLAR_BIN=${CELLAR_BIN:-$REPO/target/release/cellar}
if [[ ! -x $CELLAR_BIN ]]; then
    echo "runners.sh: no cellar binary at $CELLAR_BIN: build it (cargo build --release -p cellar-cli), set CELLAR_BIN or pass it" >&2
    exit 2
fi
COUNT=${RUNNERS_SANDBOXES:-60}
CONCURRENCY=${RUNNERS_CONCURRENCY:-6}
DETECT_RUNS=${RUNNERS_DETECT_RUNS:-3}
TIMEOUT=${RUNNERS_TIMEOUT:-10s}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
# Under /var/tmp, not /tmp (a sandbox has its own private /tmp).
WORK=$(mktemp -d /var/tmp/cellar-runners.XXXXXX)
SERVER_PID=
API_KEY=
declare -A RUNNER_PID RUNNER_PORT
# shellcheck source=../tests/harness/server.sh
source "$REPO/tests/harness/server.sh"

start_runner() { # name
    "$CELLAR_BIN" runner --server "$URL" --name "$1" --listen "127.0.0.1:${RUNNER_PORT[$1]}" \
        --data-dir "$WORK/$1" >>"$WORK/$1.log" 2>&1 &
    RUNNER_PID[$1]=$!
}

wait_runners_live() { # names...
    for _ in $(seq 1 300); do
        local listed ok=1
        listed=$("$CELLAR_BIN" admin runner list --data-dir "$WORK/server" 2>/dev/null)
        for name in "$@"; do
            grep -qE "^$name +live " <<<"$listed" || ok=0
        done
        [[ $ok == 1 ]] && return 0
        sleep 0.1
    done
    echo "runners.sh: runners $* never became live" >&2
    return 1
}

cleanup() {
    set +e
    if [[ -n $API_KEY ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        RUNNERS_API_KEY=$API_KEY python3 "$HERE/runners.py" destroy-all --url "$URL"
    fi
    for name in "${!RUNNER_PID[@]}"; do
        server_stop "${RUNNER_PID[$name]}"
    done
    [[ -n $SERVER_PID ]] && server_stop "$SERVER_PID"
    server_end_leftovers "$WORK"
    if [[ ${RUNNERS_KEEP:-0} == 1 ]]; then
        echo "kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== $("$CELLAR_BIN" --version), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== server on $URL without its embedded runner (runner timeout $TIMEOUT), work dir $WORK"
"$CELLAR_BIN" server --listen "127.0.0.1:$PORT" --data-dir "$WORK/server" --store "file://$WORK/blocks" \
    --no-embedded-runner --runner-timeout "$TIMEOUT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
if ! API_KEY=$(server_bootstrap_key "$WORK/server.log" "$SERVER_PID" "$PORT"); then
    echo "runners.sh: the server did not start; its log:" >&2
    sed -E 's/cellar_[0-9a-f]{64}/cellar_<redacted>/g' "$WORK/server.log" >&2
    exit 1
fi
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
CELLAR_RUNNER_TOKEN=$("$CELLAR_BIN" admin runner-token create --name bench --data-dir "$WORK/server" 2>/dev/null)
export CELLAR_RUNNER_TOKEN
for name in r1 r2 r3; do
    RUNNER_PORT[$name]=$(free_port)
    start_runner "$name"
done
wait_runners_live r1 r2 r3
echo "== three runners live"

export RUNNERS_API_KEY=$API_KEY
python3 "$HERE/runners.py" start --url "$URL" --count "$COUNT" --concurrency "$CONCURRENCY"
python3 "$HERE/runners.py" destroy-all --url "$URL"

timeout_ms=$(python3 -c "import re,sys; v='$TIMEOUT'; m=re.fullmatch(r'(\d+)(ms|s)',v); print(int(m[1])*(1 if m[2]=='ms' else 1000))")
for run in $(seq 1 "$DETECT_RUNS"); do
    sandbox=$(python3 "$HERE/runners.py" pin --url "$URL" --runner r3)
    # A random phase against the 2 s heartbeat period.
    sleep "0.$((RANDOM % 10))$((RANDOM % 10))"
    killed_at=$(date +%s.%N)
    kill -9 "${RUNNER_PID[r3]}"
    wait "${RUNNER_PID[r3]}" 2>/dev/null || true
    python3 "$HERE/runners.py" detect --url "$URL" --sandbox "$sandbox" --killed-at "$killed_at" \
        --run "$run" --timeout-ms "$timeout_ms"
    grep -o 'runner lost: no heartbeat for [0-9]* ms' "$WORK/server.log" | tail -n 1 | sed 's/^/   server: /'
    start_runner r3
    wait_runners_live r3
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
