#!/usr/bin/env bash
# Property-based requests generated from the served OpenAPI document (/api/openapi.json) by
# schemathesis (pinned in requirements.txt, installed into tests/api/.venv), against a running
# `cellar server` (temporary data directory, file:// store), two organizations with a volume, a
# file in it and a sandbox each. Runs over every endpoint: without a key, with an invalid
# key, with a well-formed unknown key (as a revoked one), with the second organization's key on
# the first's objects, and with the first organization's key. Fails on any 5xx, on any response
# the document does not describe (status code, content type, headers, body schema), on a success
# without a valid key, and on any answer that carries an id or a marker of an organization the
# key does not belong to (tests/api/hooks.py). Prints the totals (requests, endpoints, 5xx). Then 200 concurrent clients for 20 s
# (tests/api/load.py): every answer must be the expected one.
#
# Environment:
#   CELLAR_BIN          the cellar binary (default: target/release/cellar of this repository)
#   FUZZ_MAX_EXAMPLES   examples per operation and phase (default 25; e.g. 500 for a long run)
#   FUZZ_MAX_TIME       seconds each phase group (coverage; fuzzing and stateful) of a run with a
#                       valid key may take (default 150: each reached all 43 operations in
#                       65 s and 204 s on a quiet 2-core machine; schemathesis overruns it)
#   FUZZ_MAX_TIME_UNAUTH  seconds each run without a valid key may take (default 20)
#   FUZZ_SEED           hypothesis seed, to reproduce a run
#   FUZZ_KEEP           1 to keep the data directory, the server log and the reports
#   FUZZ_DATABASE       a postgres:// URL of an empty database: the server keeps its control state
#                       and the volumes' metadata there instead of SQLite files
#   LOAD_CLIENTS, LOAD_SECONDS   the concurrent clients' number and duration (200, 20)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CELLAR_BIN=${CELLAR_BIN:-$REPO/target/release/cellar}
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-25}
MAX_TIME=${FUZZ_MAX_TIME:-150}
MAX_TIME_UNAUTH=${FUZZ_MAX_TIME_UNAUTH:-20}
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

# The server and `cellar admin` read it.
[[ -z ${FUZZ_DATABASE:-} ]] || export CELLAR_DATABASE=$FUZZ_DATABASE
echo "== starting $CELLAR_BIN server on 127.0.0.1:$PORT (data dir $DATA_DIR${FUZZ_DATABASE:+, PostgreSQL})"
# No rate limit: 200 clients on one key are the point of the load run (the limit has its own
# tests in crates/server/tests/limits.rs).
CELLAR_RATE_LIMIT=0 "$CELLAR_BIN" server --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" --store "file://$DATA_DIR/blocks" \
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

# Objects of both organizations. The hooks put A's into path parameters; their ids, A's
# organization id and markers in A's sandbox environment and volume file must never reach a key
# of another organization (nor no key at all). The sandboxes have no network: generated commands
# run in them.
api() { # method path key [json]
    curl -sf -X "$1" -H "Authorization: Bearer $3" -H 'Content-Type: application/json' \
        ${4:+--data "$4"} "$BASE$2"
}
field() { python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }
objects() { # organization key: its volume, a file in it, a sandbox with both; sets O_* variables
    local marker=marker$1$RANDOM$RANDOM sandbox
    O_VOLUME_NAME=fuzz-volume-$1 O_SANDBOX_NAME=fuzz-sandbox-$1
    O_VOLUME_ID=$(api POST /api/volumes "$2" "{\"name\":\"$O_VOLUME_NAME\"}" | field id)
    curl -sf -X PUT -H "Authorization: Bearer $2" --data-binary "file-$marker" \
        "$BASE/api/volumes/$O_VOLUME_ID/files/content?path=/$marker.txt" >/dev/null
    sandbox=$(api POST /api/sandbox "$2" "{\"name\":\"$O_SANDBOX_NAME\",\"networkBlockAll\":true,\"env\":{\"SECRET\":\"env-$marker\"},\"volumes\":[{\"volumeId\":\"$O_VOLUME_NAME\",\"mountPath\":\"/home/daytona/volume\"}]}")
    O_SANDBOX_ID=$(field id <<<"$sandbox")
    O_SECRETS="$O_VOLUME_ID,$O_SANDBOX_ID,$(field organizationId <<<"$sandbox"),$marker"
}
objects b "$KEY_B"
FUZZ_SECRETS_B=$O_SECRETS
objects a "$KEY_A"
FUZZ_SECRETS_A=$O_SECRETS
export FUZZ_VOLUME_NAME=$O_VOLUME_NAME FUZZ_SANDBOX_NAME=$O_SANDBOX_NAME FUZZ_VOLUME_ID=$O_VOLUME_ID \
    FUZZ_SANDBOX_ID=$O_SANDBOX_ID FUZZ_SECRETS_A FUZZ_SECRETS_B
export SCHEMATHESIS_HOOKS=hooks

status=0
RUNS=()
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,foreign_objects_stay_hidden,unauthenticated_requests_are_refused,no_other_organizations_data
run_schemathesis() { # mode seconds key checks [options...]
    local mode=$1 seconds=$2 key=$3 checks=$4
    shift 4
    FUZZ_MODE=$mode PYTHONPATH=$HERE timeout --kill-after=30 $((seconds + 120)) \
        .venv/bin/schemathesis run "$BASE/api/openapi.json" --url "$BASE" \
        ${key:+-H "Authorization: Bearer $key"} --checks "$checks" \
        --max-examples "$MAX_EXAMPLES" --max-time "$seconds" --seed "$SEED" \
        --request-timeout 60 --workers 1 --no-color "$@"
}
fuzz() { # label mode seconds key [options...]
    local report=$REPORTS/run-${#RUNS[@]} label=$1 mode=$2 seconds=$3 key=$4
    shift 4
    RUNS+=("$label")
    echo "== schemathesis ($label), seed $SEED, at most $MAX_EXAMPLES examples per operation, ${seconds}s"
    run_schemathesis "$mode" "$seconds" "$key" "$CHECKS" "$@" \
        --report junit,har --report-junit-path "$report.xml" --report-har-path "$report.har" || status=1
}
# With a valid key requests do real work (sandboxes start, volumes mount) and the coverage phase
# alone can use up a whole time budget (it did: 28 of 43 operations in 60 s, and no fuzzing or
# stateful phase at all), so the coverage phase and the generated phases get a budget each.
fuzz_with_key() { # label mode seconds key
    fuzz "$1 (coverage)" "$2" "$3" "$4" --phases examples,coverage
    fuzz "$1 (fuzzing)" "$2" "$3" "$4" --phases fuzzing,stateful
}
# Unauthenticated and foreign runs first, while A's objects exist (A's own run may delete them).
fuzz "no key" anonymous "$MAX_TIME_UNAUTH" ""
fuzz "invalid key" anonymous "$MAX_TIME_UNAUTH" "cellar_invalid"
# What a revoked or expired key looks like: well formed, not (or no longer) in the database.
fuzz "unknown key" anonymous "$MAX_TIME_UNAUTH" "cellar_$(printf '0%.0s' {1..64})"
fuzz_with_key "organization B on A's objects" foreign "$MAX_TIME" "$KEY_B"
# Control: A's own key in B's place must trip the check for another organization's data, or the
# check sees nothing.
echo "== control: organization A's key where B's belongs (must fail)"
if run_schemathesis foreign 60 "$KEY_A" no_other_organizations_data --max-failures 1 >"$REPORTS/control.log" 2>&1; then
    echo "fuzz.sh: A's key read A's objects and the check for another organization's data did not fail" >&2
    status=1
else
    grep -m1 "another organization's" "$REPORTS/control.log" || {
        cat "$REPORTS/control.log" >&2
        status=1
    }
fi
fuzz_with_key "organization A" own "$MAX_TIME" "$KEY_A"
python3 totals.py "$BASE/api/openapi.json" "${RUNS[@]}" -- "$REPORTS"/run-*.har || status=1
echo "== ${LOAD_CLIENTS:-200} concurrent clients for ${LOAD_SECONDS:-20} s"
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
