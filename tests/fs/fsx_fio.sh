#!/usr/bin/env bash
# fsx (pread/pwrite, mmap reads and writes, truncate, fallocate, fsync, ...) on one file, then
# fio writing sequentially and randomly with crc32c verification, re-verified after a remount so
# the data is read back from the object store.
#   CELLAR_FSX_OPS (default 50000; tests/fsx_full.sh: 1,000,000), CELLAR_FSX_SEED (random if unset),
#   CELLAR_FIO_SIZE (256M)
source "$(dirname "$0")/../harness/suite.sh"

command -v fsx >/dev/null || fail "fsx is not installed (cargo install fsx --locked)"
command -v fio >/dev/null || fail "fio is not installed (apt-get install fio)"
ops=${CELLAR_FSX_OPS:-50000}
seed=${CELLAR_FSX_SEED:-$((RANDOM * 32768 + RANDOM))}
fio_size=${CELLAR_FIO_SIZE:-256M}

note "fsx: $ops operations, seed $seed (rerun with CELLAR_FSX_SEED=$seed)"
mkdir "$WORK/fsx-artifacts"
started=$SECONDS
RUST_LOG=warn fsx -N "$ops" -S "$seed" -f "$REPO_DIR/tests/fs/fsx.toml" -P "$WORK/fsx-artifacts" \
  "$MNT/fsx.data" > "$WORK/fsx.out" 2>&1 ||
  fail "fsx failed (seed $seed): $(tail -n 30 "$WORK/fsx.out")"
note "fsx: $ops operations ok in $((SECONDS - started))s"

fio_job() { # name rw bs extra-args...
  local name=$1 rw=$2 bs=$3
  shift 3
  fio --name="$name" --filename="$MNT/$name.fio" --rw="$rw" --bs="$bs" --size="$fio_size" \
    --ioengine=psync --verify=crc32c --verify_fatal=1 --verify_state_save=0 --randrepeat=1 \
    --end_fsync=1 \
    --output="$WORK/$name.out" "$@" ||
    fail "fio $name ($*) failed: $(tail -n 20 "$WORK/$name.out")"
}

for job in "seq write 1M" "rand randwrite 4k"; do
  set -- $job
  started=$SECONDS
  fio_job "$1" "$2" "$3" --do_verify=1
  note "fio $1 ($2, bs $3, $fio_size): written and verified in $((SECONDS - started))s"
done

volume remount "$WORK/v" >/dev/null || fail "remount failed"
for job in "seq write 1M" "rand randwrite 4k"; do
  set -- $job
  started=$SECONDS
  fio_job "$1" "$2" "$3" --verify_only
  note "fio $1: verified again after a remount in $((SECONDS - started))s"
done
note "ok"
