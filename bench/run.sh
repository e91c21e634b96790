#!/usr/bin/env bash
# Cellar benchmark: the same workloads on local disk, a Cellar mount, an s3fs mount and an rclone
# mount of one S3 server (Ceph RGW started here), in one run. Prints seconds and the ratio to local
# disk for each row. Not a test: it asserts nothing, it measures.
#
#   bash bench/run.sh            # needs root, fuse3, s3fs, rclone, radosgw (see .ci/run)
#   BENCH_SIZE_MB=256 bash bench/run.sh   # smaller big-file rows
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
size_mb=${BENCH_SIZE_MB:-1024}
work=$(mktemp -d /tmp/cellar-bench.XXXXXX)
cellar=${CELLAR_BIN:-$root/target/release/cellar}
[ -x "$cellar" ] || cargo build --release -p cellar-cli
systems=(local cellar s3fs rclone)
declare -A mnt result

log() { printf '%s\n' "$*" >&2; }

cleanup() {
  set +e
  for s in cellar s3fs rclone; do
    [ -n "${mnt[$s]:-}" ] && mountpoint -q "${mnt[$s]}" && { fusermount3 -u "${mnt[$s]}" || umount -l "${mnt[$s]}"; }
  done
  bash tests/harness/rgw.sh stop "$work/rgw" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# One S3 server for every peer; sized for three copies of each workload.
export CELLAR_RGW_MEMSTORE_BYTES=$(( (size_mb * 3 + 3072) * 1024 * 1024 ))
bash tests/harness/rgw.sh start "$work/rgw" >&2
# shellcheck disable=SC1091
source "$work/rgw/env"
endpoint=$CELLAR_TEST_S3_ENDPOINT
bucket=cellar-test

mount_system() {
  local s=$1 dir=$2
  case $s in
    local) ;;
    cellar)
      "$cellar" mount --meta "sqlite://$work/cellar-meta.db" --store "$CELLAR_TEST_S3_URL" \
        --volume bench --cache-dir "$work/cellar-cache" "$dir" ;;
    s3fs)
      printf '%s:%s\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > "$work/s3fs.passwd"
      chmod 600 "$work/s3fs.passwd"
      s3fs "$bucket:/s3fs" "$dir" -o url="$endpoint" -o use_path_request_style \
        -o passwd_file="$work/s3fs.passwd" -o allow_other ;;
    rclone)
      env -u AWS_CA_BUNDLE -u SSL_CERT_FILE -u REQUESTS_CA_BUNDLE -u CURL_CA_BUNDLE \
        RCLONE_CONFIG_RGW_TYPE=s3 RCLONE_CONFIG_RGW_PROVIDER=Ceph RCLONE_CONFIG_RGW_ENDPOINT="$endpoint" \
        RCLONE_CONFIG_RGW_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" RCLONE_CONFIG_RGW_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
        rclone mount "rgw:$bucket/rclone" "$dir" --vfs-cache-mode writes --cache-dir "$work/rclone-cache" \
        --allow-other --daemon ;;
  esac
  if [ "$s" != local ]; then
    for _ in $(seq 100); do mountpoint -q "$dir" && return 0; sleep 0.1; done
    log "mount of $s at $dir did not come up"; return 1
  fi
}

unmount_system() {
  local s=$1 dir=$2
  [ "$s" = local ] && return 0
  case $s in
    cellar) "$cellar" umount "$dir" ;;
    *) fusermount3 -u "$dir" ;;
  esac
}

# Cold caches: remount (drops each FUSE daemon's own cache) and drop the kernel's page cache.
cold() {
  local s=$1 dir=$2
  sync
  unmount_system "$s" "$dir"
  echo 3 > /proc/sys/vm/drop_caches
  mount_system "$s" "$dir"
}

timed() { # prints elapsed seconds of "$@"
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}

# Inputs, made once: a tarball of ~2,600 files and a git repository of ~5,000 files.
python3 - "$work" <<'PY'
import os, random, sys, subprocess, tarfile
work = sys.argv[1]
rnd = random.Random(42)
def tree(top, files, dirs):
    for d in range(dirs):
        os.makedirs(os.path.join(top, f"pkg{d % 17}", f"mod{d}"), exist_ok=True)
    for i in range(files):
        d = i % dirs
        size = int(rnd.lognormvariate(7.5, 1.3)) % 200_000
        with open(os.path.join(top, f"pkg{d % 17}", f"mod{d}", f"file{i}.py"), "wb") as f:
            f.write(rnd.randbytes(size // 2).hex().encode()[:size])
tree(os.path.join(work, "src-tree"), 2600, 160)
with tarfile.open(os.path.join(work, "tree.tar"), "w") as t:
    t.add(os.path.join(work, "src-tree"), arcname="tree")
repo = os.path.join(work, "repo")
tree(repo, 5000, 300)
subprocess.run(["git", "init", "-q", repo], check=True)
subprocess.run(["git", "-C", repo, "add", "-A"], check=True)
subprocess.run(["git", "-C", repo, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"], check=True)
PY

rows=("write ${size_mb} MiB + fsync" "cold read ${size_mb} MiB" "untar 2,600 files + sync" "ls -lR (cold)" "git clone 5,000 files" "rm -rf all")
for s in "${systems[@]}"; do
  dir="$work/mnt-$s"
  mkdir -p "$dir"
  mnt[$s]=$dir
  mount_system "$s" "$dir"
  log "== $s"
  result[$s,0]=$(timed dd if=/dev/zero of="$dir/big" bs=1M count="$size_mb" conv=fsync status=none)
  cold "$s" "$dir"
  result[$s,1]=$(timed dd if="$dir/big" of=/dev/null bs=1M status=none)
  result[$s,2]=$(timed sh -c "tar -xf '$work/tree.tar' -C '$dir' && sync")
  cold "$s" "$dir"
  result[$s,3]=$(timed ls -lR "$dir/tree")
  result[$s,4]=$(timed git clone -q --no-hardlinks "$work/repo" "$dir/repo")
  result[$s,5]=$(timed rm -rf "$dir/big" "$dir/tree" "$dir/repo")
  unmount_system "$s" "$dir"
  mnt[$s]=
done

printf '\n%-28s' "workload (seconds, ×local)"
for s in "${systems[@]}"; do printf '%18s' "$s"; done
printf '\n'
for i in "${!rows[@]}"; do
  printf '%-28s' "${rows[$i]}"
  base=${result[local,$i]}
  for s in "${systems[@]}"; do
    v=${result[$s,$i]}
    printf '%18s' "$(printf '%.2f (%.1f×)' "$v" "$(echo "$v / $base" | bc -l)")"
  done
  printf '\n'
done
