#!/usr/bin/env bash
# Property-based requests generated from the served OpenAPI document (/api/openapi.json) by
# schemathesis (pinned in requirements.txt, installed into tests/api/.venv), against a running
# `cellar server` (temporary data directory, file:// store). Three runs: with the first
# organization's key, with a second organization's key (objects of the first must stay hidden),
# and with an invalid key. Fails on any 5xx and on any response the document does not describe
# (status code, content type, headers, body schema). Then 200 concurrent clients for 30 s
# (tests/api/load.py): every answer must be the expected one.
#
# Environment:
#   CELLAR_BIN          the cellar binary (default: target/release/cellar of this repository)
#   FUZZ_MAX_EXAMPLES   examples per operation and phase (default 25; e.g. 500 for a long run)
#   FUZZ_MAX_TIME       seconds each of the three runs may take (default 100)
#   FUZZ_SEED           hypothesis seed, to reproduce a run
#   FUZZ_KEEP           1 to keep the data directory, the server log and the reports
#   LOAD_CLIENTS, LOAD_SECONDS   the concurrent clients' number and duration (200, 30)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CELLAR_BIN=${CELLAR_BIN:-$REPO/target/release/cellar}
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-25}
MAX_TIME=${FUZZ_MAX_TIME:-100}
SEED=${FUZZ_SEED:-$RANDOM$RANDOM}
# shellcheck source=../harness/server.sh
source "$REPO/tests/harness/server.sh"

if [[ ! -x $CELLAR_BIN ]]; then
    echo "fuzz.sh: no cellar binary at $CELLAR_BIN: build it (cargo build --release -p cellar-cli) or set CELLAR_BIN" >&2
    exit 2
fi
cd "$HERE"
if ! .venv/bin/pip freeze 2>/dev/null | grep -qxF "$(cat requirements.txt)"; then
    echo "== installing $(cat requirements.txt)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
fi

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DATA_DIR=$(mktemp -d /var/tmp/cellar-fuzz.XXXXXX)
REPORTS=$DATA_DIR/reports
mkdir -p "$REPORTS"
BASE=http://127.0.0.1:$PORT
SERVER_PID=
KEYS=()
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        [[ ${#KEYS[@]} -eq 0 ]] || python3 teardown.py "$BASE" "${KEYS[@]}" || true
        server_stop "$SERVER_PID"
    fi
    server_end_leftovers "$DATA_DIR"
    if [[ ${FUZZ_KEEP:-0} == 1 ]]; then echo "kept: $DATA_DIR"; else rm -rf "$DATA_DIR"; fi
}
trap cleanup EXIT

echo "== starting $CELLAR_BIN server on 127.0.0.1:$PORT (data dir $DATA_DIR)"
"$CELLAR_BIN" server --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" --store "file://$DATA_DIR/blocks" \
    >"$DATA_DIR/server.log" 2>&1 &
SERVER_PID=$!
if ! KEY_A=$(server_bootstrap_key "$DATA_DIR/server.log" "$SERVER_PID" "$PORT"); then
    echo "fuzz.sh: the server did not start; its log:" >&2
    sed -E 's/cellar_[0-9a-f]{64}/cellar_<redacted>/g' "$DATA_DIR/server.log" >&2
    exit 1
fi
"$CELLAR_BIN" admin --data-dir "$DATA_DIR" org create other >/dev/null
KEY_B=$("$CELLAR_BIN" admin --data-dir "$DATA_DIR" key create --org other)
KEYS=("$KEY_A" "$KEY_B")

# Objects of the first organization the hooks put into path parameters. The sandbox has no
# network: generated commands run in it.
api() { # method path key [json]
    curl -sf -X "$1" -H "Authorization: Bearer $3" -H 'Content-Type: application/json' \
        ${4:+--data "$4"} "$BASE$2"
}
field() { python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }
export FUZZ_VOLUME_NAME=fuzz-volume FUZZ_SANDBOX_NAME=fuzz-sandbox
FUZZ_VOLUME_ID=$(api POST /api/volumes "$KEY_A" '{"name":"fuzz-volume"}' | field id)
FUZZ_SANDBOX_ID=$(api POST /api/sandbox "$KEY_A" \
    '{"name":"fuzz-sandbox","networkBlockAll":true,"volumes":[{"volumeId":"fuzz-volume","mountPath":"/home/daytona/volume"}]}' \
    | field id)
export FUZZ_VOLUME_ID FUZZ_SANDBOX_ID
export SCHEMATHESIS_HOOKS=hooks

status=0
fuzz() { # label key foreign
    echo "== schemathesis ($1), seed $SEED, at most $MAX_EXAMPLES examples per operation, ${MAX_TIME}s"
    FUZZ_FOREIGN=$3 PYTHONPATH=$HERE timeout --kill-after=30 $((MAX_TIME + 120)) \
        .venv/bin/schemathesis run "$BASE/api/openapi.json" --url "$BASE" \
        -H "Authorization: Bearer $2" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,foreign_objects_stay_hidden \
        --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" --seed "$SEED" \
        --request-timeout 60 --workers 1 --no-color \
        --report junit --report-junit-path "$REPORTS/$1.xml" || status=1
}
fuzz "organization A" "$KEY_A" 0
fuzz "organization B on A's objects" "$KEY_B" 1
fuzz "invalid key" "cellar_invalid" 0
echo "== ${LOAD_CLIENTS:-200} concurrent clients for ${LOAD_SECONDS:-30} s"
# Objects of its own: the fuzz runs may well have deleted theirs.
LOAD_VOLUME_ID=$(api POST /api/volumes "$KEY_A" '{"name":"load-volume"}' | field id)
LOAD_SANDBOX_ID=$(api POST /api/sandbox "$KEY_A" '{"name":"load-sandbox","networkBlockAll":true}' | field id)
python3 load.py "$BASE" "$KEY_A" "$KEY_B" "$LOAD_SANDBOX_ID" "$LOAD_VOLUME_ID" || status=1

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "fuzz.sh: the server died during the run" >&2
    status=1
fi
if grep -q "panicked" "$DATA_DIR/server.log"; then
    echo "fuzz.sh: the server panicked:" >&2
    grep -A3 "panicked" "$DATA_DIR/server.log" >&2
    status=1
fi
exit $status
