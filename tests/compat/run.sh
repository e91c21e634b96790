#!/usr/bin/env bash
# Compatibility tests of Cellar with the OFFICIAL Daytona clients: PyPI `daytona` and npm
# `@daytonaio/sdk`, at the versions pinned in requirements.txt and package.json.
#
# Starts `cellar server` on a free loopback port with a temporary data directory and a file://
# store, points the clients at it (DAYTONA_API_URL, DAYTONA_API_KEY = the bootstrap key the server
# prints on first start), runs the Python (pytest) and TypeScript (node) suites, prints a matrix
# (case x client and call x client) and exits non-zero on any failure. Builds nothing.
#
# Environment:
#   CELLAR_BIN       the cellar binary (default: target/release/cellar of this repository)
#   COMPAT_SUITES    which suites to run (default: "py ts")
#   COMPAT_MEASURE   1 (default) to also print the timing and concurrency measurements, 0 to skip
#   COMPAT_MEASURE_ARGS  options for py/measure.py, e.g. "--steps 5,10,20,40 --runs 10"
#   COMPAT_KEEP      1 to keep the server's data directory and log for inspection
#   COMPAT_LARGE_FILE_MIB  size of the file case k streams in and out (default 1024)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CELLAR_BIN=${CELLAR_BIN:-$REPO/target/release/cellar}
SUITES=${COMPAT_SUITES:-py ts}
MEASURE=${COMPAT_MEASURE:-1}

if [[ ! -x $CELLAR_BIN ]]; then
    echo "run.sh: no cellar binary at $CELLAR_BIN: build it (cargo build --release -p cellar-cli) or set CELLAR_BIN" >&2
    exit 2
fi

# --- the official clients, pinned -------------------------------------------------------------
cd "$HERE"
if ! .venv/bin/python -c 'import daytona, pytest' 2>/dev/null \
    || ! .venv/bin/pip freeze 2>/dev/null | grep -qxF "$(grep -E '^daytona==' requirements.txt)"; then
    echo "== installing the Python client ($(grep -E '^daytona==' requirements.txt))"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
fi
if [[ ! -d node_modules/@daytonaio/sdk ]] || [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
    echo "== installing the TypeScript client (npm ci)"
    npm ci --no-audit --no-fund --loglevel=error
fi

# --- the server -----------------------------------------------------------------------------------
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Under /var/tmp, not /tmp: a sandbox that saw the host's /var would see the control DB (case i, h).
DATA_DIR=$(mktemp -d /var/tmp/cellar-compat.XXXXXX)
RESULTS=$HERE/.work/results-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
SERVER_LOG=$RESULTS/server.log
# Fake credentials in the server's environment; case i checks no sandbox can see them.
CANARY=canary-$(python3 -c 'import secrets; print(secrets.token_hex(8))')

SERVER_PID=
API_KEY=
# shellcheck source=../harness/server.sh
source "$REPO/tests/harness/server.sh"
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        # The server keeps sandboxes running across its own restarts: delete them before stopping it.
        if [[ -n $API_KEY ]]; then
            DAYTONA_API_URL="http://127.0.0.1:$PORT/api" DAYTONA_API_KEY=$API_KEY python3 "$HERE/teardown.py" || true
        fi
        server_stop "$SERVER_PID"
    fi
    server_end_leftovers "$DATA_DIR"
    if [[ ${COMPAT_KEEP:-0} == 1 ]]; then
        echo "kept: data dir $DATA_DIR, results and server log in $RESULTS"
    else
        rm -rf "$DATA_DIR"
    fi
}
trap cleanup EXIT

echo "== starting $CELLAR_BIN server on 127.0.0.1:$PORT (data dir $DATA_DIR, log $SERVER_LOG)"
env AWS_ACCESS_KEY_ID="cellar-access-$CANARY" \
    AWS_SECRET_ACCESS_KEY="cellar-secret-$CANARY" \
    AWS_SESSION_TOKEN="cellar-session-$CANARY" \
    PGPASSWORD="cellar-db-$CANARY" \
    "$CELLAR_BIN" server --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" --store "file://$DATA_DIR/blocks" \
    >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

redacted_log() { sed -E 's/cellar_[0-9a-f]{64}/cellar_<redacted>/g' "$SERVER_LOG"; }
if ! API_KEY=$(server_bootstrap_key "$SERVER_LOG" "$SERVER_PID" "$PORT"); then
    API_KEY=
    echo "run.sh: the server exited, or printed no bootstrap API key (cellar_<64 hex>) within 30 s; its log:" >&2
    redacted_log >&2
    exit 1
fi

# Only these reach the clients: nothing of the developer's own Daytona configuration.
unset DAYTONA_JWT_TOKEN DAYTONA_ORGANIZATION_ID DAYTONA_TARGET DAYTONA_SERVER_URL
export DAYTONA_API_URL="http://127.0.0.1:$PORT/api"
export DAYTONA_API_KEY=$API_KEY
export COMPAT_RESULTS=$RESULTS COMPAT_CANARY=$CANARY COMPAT_DATA_DIR=$DATA_DIR
# The large-file case reads the server's peak RSS (VmHWM) from /proc.
export COMPAT_SERVER_PID=$SERVER_PID
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
echo "== DAYTONA_API_URL=$DAYTONA_API_URL"

status=0
for suite in $SUITES; do
    case $suite in
        py)
            echo "== Python: daytona $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("daytona"))')"
            .venv/bin/python -m pytest -q -p no:cacheprovider -o console_output_style=classic --tb=short \
                --rootdir "$HERE/py" "$HERE/py" || status=1
            ;;
        ts)
            echo "== TypeScript: @daytonaio/sdk $(node -p 'require("@daytonaio/sdk/package.json").version')"
            node ts/run.mjs || status=1
            ;;
        *)
            echo "run.sh: unknown suite $suite (py, ts)" >&2
            exit 2
            ;;
    esac
done

# shellcheck disable=SC2086 # one argument per suite
.venv/bin/python matrix.py "$RESULTS" $SUITES || status=1

if [[ $MEASURE == 1 ]]; then
    # shellcheck disable=SC2086 # word splitting intended: extra options for measure.py
    .venv/bin/python py/measure.py ${COMPAT_MEASURE_ARGS:-} || echo "(measurement aborted: see above)"
fi

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "run.sh: the server died during the tests; tail of its log:" >&2
    redacted_log | tail -n 40 >&2
    status=1
fi
exit $status
