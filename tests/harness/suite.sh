# Shared setup of the shell suites in tests/fs/ (source it): a fresh volume, mounted, torn down
# on exit. Sets WORK (scratch directory, local disk) and MNT (the mount point).
set -euo pipefail

HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HARNESS_DIR/../.." && pwd)
SUITE=$(basename "$0" .sh)

fail() { echo "$SUITE: FAILED: $*" >&2; exit 1; }
note() { echo "$SUITE: $*"; }

volume() { python3 "$HARNESS_DIR/volume.py" "$@"; }

# Short paths: pjdfstest binds unix sockets deep inside the mount (sun_path holds 108 bytes).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/c-XXXXXX")
MNT=$(volume mount "$WORK/v") || fail "cannot mount a fresh volume"

# The volume is always unmounted; after a success its data is deleted (objects too), after a
# failure the scratch directory is kept for inspection.
finish() {
  local status=$?
  cd /
  if [ "$status" -eq 0 ]; then
    volume destroy "$WORK/v" || { status=1; echo "$SUITE: FAILED: deleting the volume's data" >&2; }
  fi
  volume cleanup "$WORK/v" || true
  if [ "$status" -eq 0 ]; then
    rm -rf "$WORK"
  else
    echo "$SUITE: scratch directory kept: $WORK (mount log: $WORK/v/mount.log)" >&2
  fi
  exit "$status"
}
trap finish EXIT
