#!/usr/bin/env bash
# Cellar benchmark: the same workloads on local disk, a Cellar mount, an s3fs mount and an rclone
# mount of one S3 server (a Ceph RGW started here), in one run. Prints seconds and the ratio to
# local disk for each row, and the peak RSS of each FUSE daemon. Not a test: it asserts nothing,
# it measures. See bench/README.md for what each row means.
#
#   bash bench/run.sh                          # needs root, fuse3, s3fs, rclone, bc, radosgw
#   BENCH_SIZE_MB=256 bash bench/run.sh        # smaller big-file rows (debugging)
#   BENCH_SYSTEMS="local cellar" bash bench/run.sh   # a subset of the systems
#   BENCH_KEEP=1 ...                           # keep the work directory (logs) afterwards
#   BENCH_ROW_TIMEOUT=300 ...                  # stop a row after that many seconds; shown as "> 300"
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
size_mb=${BENCH_SIZE_MB:-1024}
row_timeout=${BENCH_ROW_TIMEOUT:-0}   # 0: no limit
read -r -a systems <<< "${BENCH_SYSTEMS:-local cellar s3fs rclone}"
work=$(mktemp -d "${BENCH_WORK_PARENT:-/var/tmp}/cellar-bench.XXXXXX")
cellar=${CELLAR_BIN:-$root/target/release/cellar}
[ -x "$cellar" ] || cargo build --release -p cellar-cli
bucket=cellar-test
declare -A mnt result peak_rss
daemon_pid=      # pid of the FUSE daemon currently mounted (s3fs, rclone: our child; cellar: its pid file)

log() { printf '%s\n' "$*" >&2; }

# The CA variables this machine sets break rclone 1.60 even on plain http (LoadCustomCABundleError).
without_ca_vars() {
  env -u AWS_CA_BUNDLE -u SSL_CERT_FILE -u SSL_CERT_DIR -u REQUESTS_CA_BUNDLE -u CURL_CA_BUNDLE \
    -u NODE_EXTRA_CA_CERTS -u GIT_SSL_CAINFO "$@"
}

# rclone's remote `rgw:` is configured through the environment only (no config file).
rclone_env() {
  without_ca_vars RCLONE_CONFIG=/dev/null \
    RCLONE_CONFIG_RGW_TYPE=s3 RCLONE_CONFIG_RGW_PROVIDER=Ceph RCLONE_CONFIG_RGW_ENDPOINT="$endpoint" \
    RCLONE_CONFIG_RGW_REGION=us-east-1 RCLONE_CONFIG_RGW_FORCE_PATH_STYLE=true \
    RCLONE_CONFIG_RGW_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
    RCLONE_CONFIG_RGW_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" "$@"
}

cleanup() {
  set +e
  for s in cellar s3fs rclone; do
    if [ -n "${mnt[$s]:-}" ] && mountpoint -q "${mnt[$s]}"; then
      fusermount3 -u "${mnt[$s]}" || umount -l "${mnt[$s]}"
    fi
  done
  [ -n "$daemon_pid" ] && wait_for_exit "$daemon_pid" 30
  bash tests/harness/rgw.sh stop "$work/rgw" >/dev/null 2>&1
  if [ -n "${BENCH_KEEP:-}" ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# One S3 server for every peer, RAM-backed: room for every system's data at once plus the RGW
# garbage that deleted objects leave for a few seconds.
export CELLAR_RGW_MEMSTORE_BYTES=$(( (size_mb * 3 + 3072) * 1024 * 1024 ))
bash tests/harness/rgw.sh start "$work/rgw" >&2
# shellcheck disable=SC1091
source "$work/rgw/env"
endpoint=$CELLAR_TEST_S3_ENDPOINT
# Each system keeps its data under its own prefix of the bucket: cellar/, s3fs/, rclone/.
cellar_store="s3://$bucket/cellar?endpoint=$endpoint&region=us-east-1"
printf '%s:%s\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > "$work/s3fs.passwd"
chmod 600 "$work/s3fs.passwd"

wait_for_exit() { # pid timeout_seconds
  local pid=$1 deadline=$((SECONDS + $2))
  while [ -e "/proc/$pid" ] && ! grep -q '^State:.*[ZX]' "/proc/$pid/status" 2>/dev/null; do
    ((SECONDS < deadline)) || { log "process $pid still running after $2 s"; return 1; }
    sleep 0.05
  done
  wait "$pid" 2>/dev/null || true
}

wait_for_mount() { # dir pid
  local dir=$1 pid=$2
  for _ in $(seq 600); do
    mountpoint -q "$dir" && return 0
    [ -e "/proc/$pid" ] || { log "the daemon exited before mounting $dir"; return 1; }
    sleep 0.05
  done
  log "mount at $dir did not come up"; return 1
}

# Fresh per-mount caches: a remount must not read from a disk cache left by the previous mount.
mount_system() { # system dir
  local s=$1 dir=$2
  case $s in
    local) return 0 ;;
    cellar)
      rm -rf "$work/cellar-cache"
      RUST_LOG=${BENCH_CELLAR_LOG:-info} "$cellar" mount --meta "sqlite://$work/cellar-meta.db" \
        --store "$cellar_store" --volume bench --cache-dir "$work/cellar-cache" \
        --log-file "$work/cellar.log" "$dir"
      # `cellar mount` returns once the mount is live; its daemon records its pid.
      daemon_pid=$(cut -d' ' -f1 "/run/cellar/mount-$(realpath "$dir" | sed 's/%/%25/g; s|/|%2F|g').pid")
      ;;
    s3fs)
      # Foreground (-f) in our background, so we know the pid and can wait for it to exit.
      s3fs "$bucket:/s3fs" "$dir" -f -o url="$endpoint" -o use_path_request_style \
        -o endpoint=us-east-1 -o passwd_file="$work/s3fs.passwd" -o allow_other \
        >>"$work/s3fs.log" 2>&1 &
      daemon_pid=$!
      wait_for_mount "$dir" "$daemon_pid"
      ;;
    rclone)
      rm -rf "$work/rclone-cache"
      # --vfs-cache-mode writes: the mode rclone documents for applications that write (git,
      # tar need it). Its uploads are asynchronous (see wait_until_stored); --vfs-write-back 0s
      # starts them at close instead of 5 s later, rclone's best case.
      rclone_env rclone mount "rgw:$bucket/rclone" "$dir" --vfs-cache-mode writes \
        --vfs-write-back 0s --cache-dir "$work/rclone-cache" --allow-other \
        --log-level INFO --log-file "$work/rclone.log" &
      wait_for_mount "$dir" "$!"
      # $! is the subshell running rclone_env; rclone itself is its child (env execs it).
      daemon_pid=$(pgrep -P "$!" -x rclone || echo "$!")
      ;;
  esac
}

unmount_system() { # system dir
  local s=$1 dir=$2 hwm
  [ "$s" = local ] && return 0
  # Peak resident memory of the daemon over this mount's life (a remount starts a new daemon).
  hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$daemon_pid/status")
  if [ "${hwm:-0}" -gt "${peak_rss[$s]:-0}" ]; then peak_rss[$s]=$hwm; fi
  case $s in
    cellar) "$cellar" umount "$dir" ;;  # waits until the daemon has flushed and exited
    *)
      # A process stopped by BENCH_ROW_TIMEOUT may still be finishing its last request there.
      for _ in $(seq 600); do fusermount3 -u -q "$dir" && break; sleep 0.1; done
      wait_for_exit "$daemon_pid" 600
      ;;
  esac
  daemon_pid=
}

# rclone acknowledges close() and fsync() before uploading (from its local cache): wait until no
# cached file is dirty any more, so that every system's row ends with the data in the store, as
# Cellar's and s3fs's close()/fsync() do. rclone marks an item dirty in its metadata file
# (vfsMeta/..., "Dirty": true) at the first write and clears it once the upload succeeded. An
# upload that failed (rclone 1.60 fails some, e.g. git's index renamed while uploading) leaves its
# item dirty for good: those, which its log names in an ERROR line, are not waited for.
wait_until_stored() { # system
  [ "$1" = rclone ] || return 0
  local meta="$work/rclone-cache/vfsMeta" file item pending failed
  while :; do
    pending=0 failed=0
    while IFS= read -r file; do
      # vfsMeta/<remote>/<bucket>/rclone/<path>: the log names the item by <path>.
      item=${file#"$meta"/*/*/rclone/}
      if grep -qF -e "ERROR : $item:" -e "ERROR : $item(" "$work/rclone.log"; then
        failed=$((failed + 1))
      else
        pending=$((pending + 1))
      fi
    done < <(grep -rlsE '"Dirty": *true' "$meta")
    if [ "$pending" = 0 ]; then
      [ "$failed" = 0 ] || log "   rclone: $failed upload(s) failed (see rclone.log)"
      return 0
    fi
    sleep 0.05
  done
}

# Cold caches: unmount (drops the daemon's memory and disk caches, see mount_system), drop the
# kernel's page, dentry and inode caches, mount again.
cold() { # system dir
  local s=$1 dir=$2
  sync
  unmount_system "$s" "$dir"
  echo 3 > /proc/sys/vm/drop_caches
  mount_system "$s" "$dir"
}

timed() { # system command... : prints the seconds until the command's writes are stored
  local s=$1 t0 t1 status=0
  shift
  t0=$(date +%s.%N)
  timeout -k 10 "$row_timeout" "$@" >/dev/null || status=$?
  if [ "$status" = 124 ]; then
    echo ">$row_timeout"
    return
  fi
  if [ "$status" != 0 ]; then
    log "$* failed with status $status"
    echo failed
    return
  fi
  wait_until_stored "$s"
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}

# Inputs, made once on local disk: a tarball of ~2,600 files and a git repository of ~5,000 files
# (source-like sizes: log-normal, median ~1.8 KB, a few up to 200 KB).
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
            f.write(rnd.randbytes(size // 2 + 1).hex().encode()[:size])
tree(os.path.join(work, "src-tree"), 2600, 160)
with tarfile.open(os.path.join(work, "tree.tar"), "w") as t:
    t.add(os.path.join(work, "src-tree"), arcname="tree")
repo = os.path.join(work, "repo")
tree(repo, 5000, 300)
subprocess.run(["git", "init", "-q", repo], check=True)
subprocess.run(["git", "-C", repo, "add", "-A"], check=True)
subprocess.run(["git", "-C", repo, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"], check=True)
subprocess.run(["git", "-C", repo, "gc", "-q"], check=True)
PY

rows=("write ${size_mb} MiB + fsync" "cold read ${size_mb} MiB" "untar 2,600 files + sync"
  "ls -lR 2,600 files (cold)" "git clone 5,000 files" "rm -rf all")
for s in "${systems[@]}"; do
  dir="$work/mnt-$s"
  mkdir -p "$dir"
  mnt[$s]=$dir
  mount_system "$s" "$dir"
  # Other processes on the machine skew a row: the load average says how busy it was.
  log "== $s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  result[$s,0]=$(timed "$s" dd if=/dev/zero of="$dir/big" bs=1M count="$size_mb" conv=fsync status=none)
  log "   write      ${result[$s,0]}"
  cold "$s" "$dir"
  result[$s,1]=$(timed "$s" dd if="$dir/big" of=/dev/null bs=1M status=none)
  log "   read       ${result[$s,1]}"
  result[$s,2]=$(timed "$s" sh -c "tar -xf '$work/tree.tar' -C '$dir' && sync")
  log "   untar      ${result[$s,2]}"
  cold "$s" "$dir"
  result[$s,3]=$(timed "$s" ls -lR "$dir/tree")
  log "   ls -lR     ${result[$s,3]}"
  # file:// makes git pack and transfer the objects, as a clone from a server does.
  result[$s,4]=$(timed "$s" git clone -q "file://$work/repo" "$dir/repo")
  log "   git clone  ${result[$s,4]}"
  [ "$s" = local ] || log "   in the bucket under $s/: $(rclone_env rclone size "rgw:$bucket/$s" 2>&1 | tr '\n' ' ')"
  result[$s,5]=$(timed "$s" rm -rf "$dir/big" "$dir/tree" "$dir/repo")
  log "   rm -rf     ${result[$s,5]}"
  unmount_system "$s" "$dir"
  mnt[$s]=
done

# The table, as Markdown (bench/README.md keeps the latest one).
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r), RGW memstore on loopback"
echo
printf '| workload (seconds, × local) |'
for s in "${systems[@]}"; do printf ' %s |' "$s"; done
printf '\n|---|'
for _ in "${systems[@]}"; do printf -- '---:|'; done
printf '\n'
for i in "${!rows[@]}"; do
  printf '| %s |' "${rows[$i]}"
  base=${result[local,$i]:-}
  for s in "${systems[@]}"; do
    v=${result[$s,$i]}
    if [ "$v" = failed ]; then printf ' failed |'; continue; fi
    bound=   # a row stopped by BENCH_ROW_TIMEOUT: its value is a lower bound
    if [ "${v:0:1}" = ">" ]; then bound="> "; v=${v:1}; fi
    if [ -n "$base" ]; then
      printf ' %s%.2f (%s%.1f×) |' "$bound" "$v" "$bound" "$(echo "$v / $base" | bc -l)"
    else
      printf ' %s%.2f |' "$bound" "$v"
    fi
  done
  printf '\n'
done
printf '| peak RSS of the daemon (MiB) |'
for s in "${systems[@]}"; do
  if [ "$s" = local ]; then printf ' – |'; else printf ' %d |' "$(( ${peak_rss[$s]:-0} / 1024 ))"; fi
done
printf '\n'
