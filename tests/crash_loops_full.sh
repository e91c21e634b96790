#!/usr/bin/env bash
# The long crash loops, run by hand: tests/fs/crash_loops.py with a few hundred kills (default
# 300: a third each of the mount daemon, a `cellar runner` and the server). tests/run.sh runs the
# same suite with 45 (suite `crash_loops`).
#
#   bash tests/crash_loops_full.sh     (needs root, /dev/fuse, bubblewrap; builds nothing)
#
# Prints per phase the kills, acknowledged operations, data lost (always 0, or the run fails) and
# the recovery times, and a JSON summary as the last line. Starts its own Ceph RGW and PostgreSQL
# unless CELLAR_TEST_S3_URL / CELLAR_TEST_POSTGRES_URL are set.
#
# Environment: CELLAR_CRASH_LOOP_ITERATIONS (default 300), CELLAR_CRASH_LOOP_SEED,
# CELLAR_CRASH_LOOP_PHASES, CELLAR_BIN (default target/release/cellar).
set -euo pipefail

cd "$(dirname "$0")/.."
export CELLAR_BIN=${CELLAR_BIN:-$PWD/target/release/cellar}
[[ -x $CELLAR_BIN ]] || { echo "crash_loops_full.sh: no cellar binary at $CELLAR_BIN (cargo build --release -p cellar-cli)" >&2; exit 2; }

scratch=$(mktemp -d /tmp/cellar-crash-loops-XXXXXX)
chmod 0755 "$scratch" # PostgreSQL runs as user postgres
cleanup() {
  [[ -d $scratch/rgw ]] && bash tests/harness/rgw.sh stop "$scratch/rgw"
  [[ -d $scratch/pg ]] && bash tests/harness/postgres.sh stop "$scratch/pg"
  rm -rf "$scratch"
}
trap cleanup EXIT
if [[ -z ${CELLAR_TEST_S3_URL:-} ]]; then
  bash tests/harness/rgw.sh start "$scratch/rgw"
  # shellcheck disable=SC1091
  source "$scratch/rgw/env"
fi
if [[ -z ${CELLAR_TEST_POSTGRES_URL:-} ]]; then
  bash tests/harness/postgres.sh start "$scratch/pg"
  set -a # NAME=VALUE lines
  # shellcheck disable=SC1091
  source "$scratch/pg/env"
  set +a
fi

export CELLAR_CRASH_LOOP_ITERATIONS=${CELLAR_CRASH_LOOP_ITERATIONS:-300}
# As in tests/run.sh: replaced blocks are deleted after 30 s, so the RGW's OSD holds little garbage.
export CELLAR_GC_GRACE_SECS=${CELLAR_GC_GRACE_SECS:-30}
python3 tests/fs/crash_loops.py
