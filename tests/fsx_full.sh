#!/usr/bin/env bash
# The long fsx run, by hand: tests/fs/fsx_fio.sh with 1,000,000 fsx operations (about half an
# hour on 2 cores). tests/run.sh runs the same suite with 50,000 operations (suite `fsx_fio`).
#
#   bash tests/fsx_full.sh     (needs root, /dev/fuse, fsx, fio; builds nothing)
#
# Starts its own Ceph RGW unless CELLAR_TEST_S3_URL is set. Environment: CELLAR_FSX_OPS (default
# 1000000), CELLAR_FSX_SEED, CELLAR_FIO_SIZE, CELLAR_BIN (default
# target/release/cellar).
set -euo pipefail

cd "$(dirname "$0")/.."
export CELLAR_BIN=${CELLAR_BIN:-$PWD/target/release/cellar}
[[ -x $CELLAR_BIN ]] || { echo "fsx_full.sh: no cellar binary at $CELLAR_BIN (cargo build --release -p cellar-cli)" >&2; exit 2; }

# shellcheck source=harness/own_rgw.sh
source tests/harness/own_rgw.sh
own_rgw fsx

export CELLAR_FSX_OPS=${CELLAR_FSX_OPS:-1000000}
# As in tests/run.sh: replaced blocks are deleted after 30 s, so the RGW's OSD holds little garbage.
export CELLAR_GC_GRACE_SECS=${CELLAR_GC_GRACE_SECS:-30}
bash tests/fs/fsx_fio.sh
