#!/usr/bin/env bash
# Runs the README's first command (read from README.md, so the two cannot drift apart) on a free
# loopback port with a temporary data directory, then through the REST API: creates a volume and a
# sandbox mounting it, writes a file into the volume from the sandbox, reads it back from a second
# sandbox, and stops the server. Exits non-zero if any step fails; bounded in time (the start
# includes the release build on a clean checkout).
#
# Environment:
#   FIRST_COMMAND_START_MINUTES   how long build and start may take (default 45)
set -euo pipefail

cd "$(dirname "$0")/.."
me=tests/first_command.sh
START_MINUTES=${FIRST_COMMAND_START_MINUTES:-45}

# The first command line of the README's first shell block that is not a comment.
FIRST_COMMAND=$(awk '/^```sh/ { block = 1; next } block && /^```/ { exit }
    block && NF && !/^#/ { print; exit }' README.md)
[[ -n $FIRST_COMMAND ]] || { echo "$me: no first command in README.md" >&2; exit 1; }

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Under /var/tmp, not /tmp: sandboxes must not see the control state.
DATA_DIR=$(mktemp -d /var/tmp/cellar-first-command.XXXXXX)
LOG=$DATA_DIR.log
API=http://127.0.0.1:$PORT/api
SERVER_PID=
API_KEY=

fail() {
    echo "$me: $*" >&2
    exit 1
}

cleanup() {
    local status=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        # Sandboxes outlive a server stop by design: delete them first.
        if [[ -n $API_KEY ]]; then
            DAYTONA_API_URL=$API DAYTONA_API_KEY=$API_KEY timeout 150 python3 tests/compat/teardown.py || status=1
        fi
        kill -TERM "$SERVER_PID"
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    # Whatever a failed step left: sandboxes and mount daemons of this data directory, mounts.
    local pid
    for pid in $(pgrep -f -- "$DATA_DIR/" || true); do kill -KILL "$pid" 2>/dev/null || true; done
    awk -v d="$DATA_DIR/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mnt; do
        fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    done
    if [[ $status -ne 0 ]]; then
        echo "$me: FAILED; tail of the server's output:" >&2
        sed -E 's/cellar_[0-9a-f]{64}/cellar_<redacted>/g' "$LOG" | tail -n 40 >&2
    fi
    rm -rf "$DATA_DIR" "$LOG"
    exit "$status"
}
trap cleanup EXIT

# call METHOD PATH [JSON BODY]: prints the response body; fails on an HTTP error.
call() {
    curl -sS --fail-with-body --max-time 120 -X "$1" -H "Authorization: Bearer $API_KEY" \
        -H 'Content-Type: application/json' ${3:+--data "$3"} "http://127.0.0.1:$PORT$2" \
        || fail "$1 $2 failed"
}
# field NAME: that field of the JSON object on stdin.
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# create_sandbox VOLUME_ID: prints the id of a started sandbox that mounts the volume.
create_sandbox() {
    local sandbox id state
    sandbox=$(call POST /api/sandbox \
        "{\"volumes\":[{\"volumeId\":\"$1\",\"mountPath\":\"/home/daytona/volume\"}]}")
    id=$(field id <<<"$sandbox")
    state=$(field state <<<"$sandbox")
    for _ in $(seq 1 120); do
        [[ $state == creating ]] || break
        sleep 0.5
        state=$(call GET "/api/sandbox/$id" | field state)
    done
    [[ $state == started ]] || fail "sandbox $id is $state, not started: $sandbox"
    echo "$id"
}

# execute SANDBOX_ID COMMAND: prints the command's output; fails on a non-zero exit.
execute() {
    local body answer
    body=$(python3 -c 'import json, sys; print(json.dumps({"command": sys.argv[1], "timeout": 60}))' "$2")
    answer=$(call POST "/toolbox/$1/process/execute" "$body")
    [[ $(field exitCode <<<"$answer") == 0 ]] || fail "in sandbox $1, '$2' failed: $answer"
    field result <<<"$answer"
}

echo "== $FIRST_COMMAND --listen 127.0.0.1:$PORT --data-dir $DATA_DIR  (output in $LOG)"
bash -c "$FIRST_COMMAND \"\$@\"" "$FIRST_COMMAND" --listen "127.0.0.1:$PORT" --data-dir "$DATA_DIR" \
    >"$LOG" 2>&1 </dev/null &
SERVER_PID=$!

# The bootstrap key (`cellar_` and 64 hex digits) is printed once, on the first start.
started=$SECONDS
deadline=$((started + START_MINUTES * 60))
until [[ -n $API_KEY ]] && curl -sf --max-time 5 -o /dev/null -H "Authorization: Bearer $API_KEY" "$API/volumes"; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the first command exited before serving"
    ((SECONDS < deadline)) || fail "not serving after $START_MINUTES minutes"
    API_KEY=$(grep -oE 'cellar_[0-9a-f]{64}' "$LOG" | head -n 1 || true)
    sleep 1
done
echo "== serving at $API after $((SECONDS - started)) s"

volume=$(call POST /api/volumes '{"name":"first-command"}')
volume_id=$(field id <<<"$volume")
[[ $(field state <<<"$volume") == ready ]] || fail "volume not ready: $volume"
echo "== volume $volume_id ready"

writer=$(create_sandbox "$volume_id")
execute "$writer" 'echo written-by-the-first-sandbox > /home/daytona/volume/hello && sync' >/dev/null
[[ $(execute "$writer" 'cat /home/daytona/volume/hello') == written-by-the-first-sandbox ]] \
    || fail "sandbox $writer does not read back what it wrote"
call DELETE "/api/sandbox/$writer" >/dev/null
echo "== sandbox $writer wrote to the volume"

reader=$(create_sandbox "$volume_id")
content=$(execute "$reader" 'cat /home/daytona/volume/hello')
[[ $content == written-by-the-first-sandbox ]] || fail "sandbox $reader reads '$content' from the volume"
echo "== sandbox $reader read it back"
echo "== $me: ok"
