#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests, then the end-to-end suites
# (tests/fs/) on real FUSE mounts backed by a real S3 server (single-node Ceph RGW started here on
# a free loopback port) with the SQLite metadata engine, a subset of them again on PostgreSQL
# (a throw-away server from tests/harness/postgres.sh, also given to `cargo test` through
# CELLAR_TEST_POSTGRES_URL), the multi-host tests (tests/multihost/run.py: three hosts as network
# namespaces), then the Daytona SDK compatibility suites (tests/compat/run.sh) and the API fuzz
# test (tests/api/fuzz.sh).
#
#   bash tests/run.sh             everything
#   bash tests/run.sh SUITE...    only these end-to-end suites (e.g. model_test workloads);
#                                 SUITE:postgres runs one on PostgreSQL, `multihost` the multi-host tests
#
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
# Needs root, /dev/fuse and the tools .ci/run installs. Seeds of the randomized suites are printed
# (CELLAR_MODEL_SEED, CELLAR_TWO_MOUNT_SEED, CELLAR_FSX_SEED, CELLAR_CRASH_SEED,
# CELLAR_CRASH_LOOP_SEED, CELLAR_SOAK_SEED reproduce a run).
set -uo pipefail

cd "$(dirname "$0")/.."
# fsx_fio last: it writes the most, and the in-memory OSD frees deleted objects lazily.
ALL_SUITES=(model_test two_mount_model_test pjdfstest workloads crash_test crash_loops copies_holes stream_read store_faults meta_faults events gateway soak fsx_fio)
# The suites that also run on PostgreSQL in a full run: the ones that exercise the metadata engine
# most per minute (fsx_fio and crash_test mostly measure the data path, which is engine-neutral).
POSTGRES_SUITES=(two_mount_model_test pjdfstest workloads events)
# Minutes each end-to-end suite may take before it counts as failed (a hung mount must not hang CI).
declare -A SUITE_MINUTES=([model_test]=20 [two_mount_model_test]=15 [pjdfstest]=30 [fsx_fio]=40 [workloads]=20 [crash_test]=20 [crash_loops]=10 [copies_holes]=10 [stream_read]=10 [store_faults]=8 [meta_faults]=6 [events]=5 [gateway]=8 [soak]=10 [multihost]=20)

# shellcheck source=harness/server.sh
source tests/harness/server.sh

failed_steps=()
e2e_passed=0
e2e_failed=0

step() { # name command...
  local name=$1 started=$SECONDS
  shift
  echo "==> $name"
  if "$@"; then
    echo "==> $name: ok ($((SECONDS - started))s)"
  else
    echo "==> $name: FAILED ($((SECONDS - started))s)"
    failed_steps+=("$name")
    return 1
  fi
}

# The cellar-vfs test binaries of the workspace build, run again with PostgreSQL metadata
# (its integration tests pick the engine; `cargo test -p cellar-vfs` would rebuild half the
# dependencies with other features).
vfs_tests_on_postgres() {
  local bins bin
  bins=$(cargo test --workspace --locked --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"] \
            and m["target"]["src_path"].startswith(sys.argv[1]):
        print(m["executable"])
' "$PWD/crates/vfs/") || return 1
  [ -n "$bins" ] || { echo "no cellar-vfs test binaries found"; return 1; }
  for bin in $bins; do
    (cd crates/vfs && CELLAR_TEST_META=postgres "$bin" -q) || return 1
  done
}

suite_command() { # suite
  if [ "$1" = multihost ]; then echo python3 tests/multihost/run.py
  elif [ -f "tests/fs/$1.py" ]; then echo python3 "tests/fs/$1.py"
  else echo bash "tests/fs/$1.sh"; fi
}

rgw_dir=$(mktemp -d /tmp/cellar-rgw-XXXXXX)
pg_dir=$(mktemp -d /tmp/cellar-pg-XXXXXX)
chmod 0755 "$pg_dir" # PostgreSQL runs as user postgres
cleanup() {
  bash tests/harness/rgw.sh stop "$rgw_dir"
  bash tests/harness/postgres.sh stop "$pg_dir/pg"
  rm -rf "$rgw_dir" "$pg_dir"
}
trap cleanup EXIT
bash tests/harness/rgw.sh start "$rgw_dir" || { echo "tests/run.sh: could not start Ceph RGW"; exit 1; }
# shellcheck disable=SC1091
source "$rgw_dir/env"
bash tests/harness/postgres.sh start "$pg_dir/pg" || { echo "tests/run.sh: could not start PostgreSQL"; exit 1; }
set -a # the env file holds plain NAME=VALUE lines
# shellcheck disable=SC1091
source "$pg_dir/pg/env"
set +a

# The RGW's in-memory OSD holds what every suite before wrote (deleted objects are freed lazily;
# a full OSD makes every request hang): the suites that write the most, and the first of the
# PostgreSQL runs, get a fresh one (about 20 s each).
FRESH_RGW_BEFORE=(soak fsx_fio)
restart_rgw() {
  bash tests/harness/rgw.sh stop "$rgw_dir"
  rm -rf "$rgw_dir" && mkdir -p "$rgw_dir" || return 1
  bash tests/harness/rgw.sh start "$rgw_dir" || return 1
  # shellcheck disable=SC1091
  source "$rgw_dir/env"
}

suites=("$@")
if [ ${#suites[@]} -eq 0 ]; then
  suites=("${ALL_SUITES[@]}")
  for suite in "${POSTGRES_SUITES[@]}"; do suites+=("$suite:postgres"); done
  suites+=(multihost)
  step "cargo fmt" cargo fmt --all --check
  step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
  step "cargo test" cargo test --workspace --locked
  # The metadata engine's suite runs on both engines by itself; the vfs suite on the one it is told.
  step "cargo test (vfs on PostgreSQL)" vfs_tests_on_postgres
fi

# The end-to-end suites use the optimized binary: fsx and fio are far too slow on a debug build.
if step "cargo build --release" cargo build --release --locked -p cellar-cli; then
  export CELLAR_BIN=$PWD/target/release/cellar
  # Replaced block objects are deleted 30 s after they stop being referenced instead of 10 min:
  # fsx and fio rewrite gigabytes, and the RGW's in-memory OSD must hold all that is not deleted.
  export CELLAR_GC_GRACE_SECS=${CELLAR_GC_GRACE_SECS:-30}
  # Suites work in TMPDIR (short: pjdfstest binds unix sockets inside the mount); a failed
  # suite leaves its scratch directory there for inspection.
  e2e_tmp=$(mktemp -d /tmp/ce-XXXXXX)
  chmod 0755 "$e2e_tmp" # pjdfstest runs parts of itself as user nobody
  previous_engine=sqlite
  for entry in "${suites[@]}"; do
    suite=${entry%:postgres}
    engine=sqlite
    [ "$suite" = "$entry" ] || engine=postgres
    if [[ " ${FRESH_RGW_BEFORE[*]} " == *" $suite "* || $engine != "$previous_engine" ]]; then
      restart_rgw || echo "tests/run.sh: could not restart Ceph RGW"
    fi
    previous_engine=$engine
    [ -n "${SUITE_MINUTES[$suite]:-}" ] && { [ "$engine" = sqlite ] || [ "$suite" != multihost ]; } ||
      { echo "unknown suite $entry (one of: ${ALL_SUITES[*]} multihost, or SUITE:postgres)"; exit 2; }
    # shellcheck disable=SC2046
    if step "e2e $entry" env TMPDIR="$e2e_tmp" CELLAR_TEST_META="$engine" \
      timeout --kill-after=60 "$((SUITE_MINUTES[$suite] * 60))" $(suite_command "$suite"); then
      e2e_passed=$((e2e_passed + 1))
    else
      e2e_failed=$((e2e_failed + 1))
    fi
    # A suite killed by its timeout cannot unmount: detach whatever it left mounted.
    awk -v dir="$e2e_tmp/" 'index($2, dir) == 1 {print $2}' /proc/self/mounts | xargs -r -n1 fusermount3 -u -z
    # The multi-host tests killed by their timeout leave hosts, a server, PostgreSQL and RGW.
    for left in "$e2e_tmp"/mh-*; do
      [ -d "$left" ] || continue
      for pid in $(server_processes "$left"); do kill -KILL "$pid" 2>/dev/null; done
      bash tests/harness/hosts.sh stop "$left/hosts"
      bash tests/harness/rgw.sh stop "$left/rgw"
      bash tests/harness/postgres.sh stop "$left/pg"
    done
  done
  rmdir "$e2e_tmp" 2>/dev/null || echo "scratch directories of failed suites: $e2e_tmp"
  if [ $# -eq 0 ]; then
    # The timing and concurrency measurements of the compatibility suite are benchmarks, not checks.
    step "compat (official Daytona SDKs)" env COMPAT_MEASURE="${COMPAT_MEASURE:-0}" bash tests/compat/run.sh
    # Requests generated from the OpenAPI document: no 5xx, every answer as documented.
    step "api fuzz (schemathesis)" bash tests/api/fuzz.sh
  fi
else
  e2e_failed=${#suites[@]}
fi

echo
[ ${#failed_steps[@]} -eq 0 ] || echo "failed steps: ${failed_steps[*]}"
echo "e2e: $e2e_passed passed, $e2e_failed failed"
[ ${#failed_steps[@]} -eq 0 ]
