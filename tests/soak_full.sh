#!/usr/bin/env bash
# The full soak, run by hand (nightly-style): tests/fs/soak.py for an hour (8 sandboxes on one
# volume, mixed workload), with its memory curve kept. tests/run.sh runs the same suite for
# about 3 minutes (suite `soak`).
#
#   bash tests/soak_full.sh            (needs root, /dev/fuse, bubblewrap; builds nothing)
#
# Writes to RESULTS (default target/soak-<UTC time>): soak.log (the suite's output, ending with a
# per-minute table of the largest RSS of the server and of the mount daemon) and memory.csv (every
# sample: seconds, server and daemon RSS in KiB). Starts its own Ceph RGW unless
# CELLAR_TEST_S3_URL is set. The binary (CELLAR_BIN, default target/release/cellar) is copied
# into RESULTS first, so a rebuild during the hour changes nothing of the run.
#
# Environment: CELLAR_SOAK_SECONDS (default 3600), CELLAR_SOAK_SANDBOXES (8), CELLAR_SOAK_SEED,
# CELLAR_SOAK_SAMPLE_SECS (5), RESULTS.
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-$PWD/target/soak-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS"
bin=${CELLAR_BIN:-$PWD/target/release/cellar}
[[ -x $bin ]] || { echo "soak_full.sh: no cellar binary at $bin (cargo build --release -p cellar-cli)" >&2; exit 2; }
cp "$bin" "$RESULTS/cellar"
export CELLAR_BIN=$RESULTS/cellar

# shellcheck source=harness/own_rgw.sh
source tests/harness/own_rgw.sh
own_rgw soak

export CELLAR_SOAK_SECONDS=${CELLAR_SOAK_SECONDS:-3600}
export CELLAR_SOAK_CSV=$RESULTS/memory.csv
# As in tests/run.sh: replaced blocks are deleted after 30 s, so the RGW's OSD holds little garbage.
export CELLAR_GC_GRACE_SECS=${CELLAR_GC_GRACE_SECS:-30}
status=0
python3 tests/fs/soak.py 2>&1 | tee "$RESULTS/soak.log" || status=$?
rm -f "$RESULTS/cellar"
echo "soak_full.sh: results in $RESULTS (exit $status)"
exit "$status"
