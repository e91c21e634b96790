#!/usr/bin/env bash
# Sandbox start time: the median of N (default 20) sandbox creates on a fresh Cellar server.
#
# Starts `cellar server` on a free loopback port with a temporary data directory and a file://
# store (as tests/compat/run.sh does), then runs bench/sandbox_start.py against it: N times
# POST /api/sandbox ({} or, with --volume, one volume mounted at /home/daytona/vol), timed from the
# request to the sandbox being `started`; each sandbox is then checked (toolbox process/execute
# `true`) and deleted until it is gone (not timed). Prints each run, min/median/p90/max in ms and
# a line `sandbox_start_ms volume=0|1 runs=N min=… median=… p90=… max=…`. Builds nothing.
# Run as root (bubblewrap sandboxes, FUSE mounts). Stops the server and removes every process and
# mount of the run on exit.
#
# Usage: bench/sandbox_start.sh [--volume] [CELLAR_BIN]
# Environment:
#   CELLAR_BIN            the cellar binary (default: target/release/cellar of this repository;
#                         the first non-option argument wins over it)
#   SANDBOX_START_RUNS    measured runs (default 20)
#   SANDBOX_START_VOLUME  1 = same as --volume
#   SANDBOX_START_WARMUP  untimed runs before the measured ones (default 0)
#   SANDBOX_START_KEEP    1 to keep the data directory and server log for inspection
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
VOLUME=${SANDBOX_START_VOLUME:-0}
RUNS=${SANDBOX_START_RUNS:-20}
WARMUP=${SANDBOX_START_WARMUP:-0}
for arg in "$@"; do
    case $arg in
        --volume) VOLUME=1 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "sandbox_start.sh: unknown option $arg" >&2; exit 2 ;;
        *) CELLAR_BIN=$arg ;;
    esac
done
CELLAR_BIN=${CELLAR_BIN:-$REPO/target/release/cellar}
if [[ ! -x $CELLAR_BIN ]]; then
    echo "sandbox_start.sh: no cellar binary at $CELLAR_BIN: build it (cargo build --release -p cellar-cli), set CELLAR_BIN or pass it" >&2
    exit 2
fi

# --- the server (the same start, key and clean-up as tests/compat/run.sh) ---------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Under /var/tmp, not /tmp, as in tests/compat/run.sh (a sandbox has its own private /tmp).
DATA_DIR=$(mktemp -d /var/tmp/cellar-sandbox-start.XXXXXX)
SERVER_LOG=$DATA_DIR.log

SERVER_PID=
HELPER_PID=
API_KEY=
# shellcheck source=../tests/harness/server.sh
source "$REPO/tests/harness/server.sh"
cleanup() {
    # The measuring helper first, so it creates no sandbox while they are being deleted.
    if [[ -n $HELPER_PID ]] && kill -0 "$HELPER_PID" 2>/dev/null; then
        kill -TERM "$HELPER_PID" 2>/dev/null || true
        wait "$HELPER_PID" 2>/dev/null || true
    fi
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        # The server keeps sandboxes running across its own restarts: delete them before stopping it.
        if [[ -n $API_KEY ]]; then
            DAYTONA_API_URL="http://127.0.0.1:$PORT/api" DAYTONA_API_KEY=$API_KEY \
                python3 "$REPO/tests/compat/teardown.py" || true
        fi
        server_stop "$SERVER_PID"
    fi
    server_end_leftovers "$DATA_DIR"
    if [[ ${SANDBOX_START_KEEP:-0} == 1 ]]; then
        echo "kept: data dir $DATA_DIR, server log $SERVER_LOG"
    else
        rm -rf "$DATA_DIR" "$SERVER_LOG"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== starting $CELLAR_BIN server on 127.0.0.1:$PORT (data dir $DATA_DIR)"
"$CELLAR_BIN" server --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" --store "file://$DATA_DIR/blocks" \
    >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

redacted_log() { sed -E 's/cellar_[0-9a-f]{64}/cellar_<redacted>/g' "$SERVER_LOG"; }
if ! API_KEY=$(server_bootstrap_key "$SERVER_LOG" "$SERVER_PID" "$PORT"); then
    echo "sandbox_start.sh: the server did not start (no bootstrap key after 30 s); its log:" >&2
    redacted_log >&2
    exit 1
fi
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

echo "== $("$CELLAR_BIN" --version 2>/dev/null || echo cellar), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
opts=(--url "http://127.0.0.1:$PORT" --runs "$RUNS" --warmup "$WARMUP")
[[ $VOLUME == 1 ]] && opts+=(--volume)
# In the background and waited for, so a signal to this script runs its trap at once.
SANDBOX_START_API_KEY=$API_KEY python3 "$HERE/sandbox_start.py" "${opts[@]}" &
HELPER_PID=$!
status=0
wait "$HELPER_PID" || status=1
HELPER_PID=
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "sandbox_start.sh: the server died during the runs; tail of its log:" >&2
    redacted_log | tail -n 40 >&2
    status=1
elif [[ $status != 0 ]]; then
    echo "sandbox_start.sh: tail of the server's log:" >&2
    redacted_log | tail -n 20 >&2
fi
exit $status
