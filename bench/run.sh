#!/usr/bin/env bash
# Cellar benchmark: the same workloads on local disk, on Cellar mounts (SQLite and PostgreSQL
# metadata), an s3fs mount and an rclone mount of one S3 server (a Ceph RGW started here), in one
# run. Prints seconds and the ratio to local disk for each row, the peak RSS of each FUSE daemon,
# a raw curl GET of the same bytes (the store's own speed) and Cellar's peak RSS while streaming
# BENCH_STREAM_MB. Not a test: it asserts nothing, it measures. See bench/README.md for the rows
# and every knob.
#
#   bash bench/run.sh                          # needs root, fuse3, s3fs, rclone, fio, bc, radosgw, postgresql
#   BENCH_SIZE_MB=256 bash bench/run.sh        # smaller big-file rows (debugging)
#   BENCH_SYSTEMS="local cellar" bash bench/run.sh   # a subset of the systems
#   BENCH_SKIP_HEAVY=1 ...                     # without the fio, pip, ls -lR 100,000 and stream rows
#   BENCH_PROFILE=read ...                     # perf profile of the Cellar daemon during that row
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
size_mb=${BENCH_SIZE_MB:-1024}
row_timeout=${BENCH_ROW_TIMEOUT:-0}   # 0: no limit
setup_timeout=${BENCH_SETUP_TIMEOUT:-600}
fio_seconds=${BENCH_FIO_SECONDS:-30}
ls_files=${BENCH_LS_FILES:-100000}
ls_dirs=${BENCH_LS_DIRS:-100}
stream_mb=${BENCH_STREAM_MB:-10240}
sqlite_rows=${BENCH_SQLITE_ROWS:-20000}
sqlite_txs=${BENCH_SQLITE_TXS:-200}
wheelhouse=${BENCH_WHEELHOUSE:-/var/tmp/cellar-bench-wheels}
profile_row=${BENCH_PROFILE:-}
read -r -a systems <<< "${BENCH_SYSTEMS:-local cellar cellar-pg s3fs rclone}"
read -r -a stream_systems <<< "${BENCH_STREAM_SYSTEMS:-cellar}"
skip=" ${BENCH_SKIP:-} "
[ -z "${BENCH_SKIP_HEAVY:-}" ] || skip+=" fio pip ls100k stream "
[ -z "$profile_row" ] || BENCH_KEEP=1   # the profile is written to the work directory
work=$(mktemp -d "${BENCH_WORK_PARENT:-/var/tmp}/cellar-bench.XXXXXX")
chmod 755 "$work"   # PostgreSQL runs as its own user under it
results=$work/results.tsv
cellar=${CELLAR_BIN:-$root/target/release/cellar}
[ -x "$cellar" ] || cargo build --release -p cellar-cli
bucket=cellar-test
declare -A mnt peak_rss
daemon_pid=      # pid of the FUSE daemon currently mounted (s3fs, rclone: our child; cellar: its pid file)
started_at=$SECONDS

log() { printf '%s\n' "$*" >&2; }
wants() { [[ $skip != *" $1 "* ]]; }
is_cellar() { [[ $1 == cellar* ]]; }
commas() { sed ':a; s/\B[0-9]\{3\}\>/,&/; ta' <<< "$1"; }

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

# A signed request to the RGW with curl's own SigV4 (as tests/harness/rgw.sh does).
s3_curl() { # method key [curl args...]
  local method=$1 key=$2
  shift 2
  curl -sS -f -X "$method" --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
    "$@" "$endpoint/$bucket/$key"
}

cleanup() {
  set +e
  for s in "${!mnt[@]}"; do
    if [ -n "${mnt[$s]:-}" ] && mountpoint -q "${mnt[$s]}"; then
      fusermount3 -u "${mnt[$s]}" || umount -l "${mnt[$s]}"
    fi
  done
  [ -n "$daemon_pid" ] && wait_for_exit "$daemon_pid" 30
  bash tests/harness/rgw.sh stop "$work/rgw" >/dev/null 2>&1
  [ -d "$work/pg" ] && bash tests/harness/postgres.sh stop "$work/pg" >/dev/null 2>&1
  if [ -n "${BENCH_KEEP:-}" ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# The pip row installs these wheels (no index, no internet during the row): downloaded once.
if wants pip && ! ls "$wheelhouse"/*.whl >/dev/null 2>&1; then
  log "making the wheelhouse $wheelhouse (pip download, once)"
  mkdir -p "$wheelhouse"
  python3 -m pip download -q -d "$wheelhouse" django==5.1.4 flask==3.1.0 requests==2.32.3 \
    sqlalchemy==2.0.36 pyyaml==6.0.2
fi

# One S3 server for every peer, RAM-backed: room for every system's big file at once, the stream
# row's file, plus the RGW garbage that deleted objects leave for a few seconds.
stream_room=0
wants stream && stream_room=$stream_mb
export CELLAR_RGW_MEMSTORE_BYTES=$(( (size_mb * 3 + stream_room + 3072) * 1024 * 1024 ))
bash tests/harness/rgw.sh start "$work/rgw" >&2
# shellcheck disable=SC1091
source "$work/rgw/env"
endpoint=$CELLAR_TEST_S3_ENDPOINT
if [[ " ${systems[*]} " == *" cellar-pg "* ]]; then
  bash tests/harness/postgres.sh start "$work/pg" >&2
  pg_url=$(sed -n 's/^CELLAR_TEST_POSTGRES_URL=//p' "$work/pg/env")
fi
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
# Each system keeps its data under its own prefix of the bucket: cellar/, cellar-pg/, s3fs/, rclone/
# (peers: $prefix if set).
mount_system() { # system dir
  local s=$1 dir=$2 meta
  case $s in
    local) return 0 ;;
    cellar | cellar-pg)
      rm -rf "$work/$s-cache"
      # The PostgreSQL URL holds a password: it reaches cellar through the environment.
      if [ "$s" = cellar ]; then meta="sqlite://$work/cellar-meta.db"; else meta="$pg_url?volume=bench"; fi
      CELLAR_META_URL=$meta RUST_LOG=${BENCH_CELLAR_LOG:-info} "$cellar" mount \
        --store "s3://$bucket/$s?endpoint=$endpoint&region=us-east-1" --volume bench \
        --cache-dir "$work/$s-cache" --log-file "$work/$s.log" "$dir"
      # `cellar mount` returns once the mount is live; its daemon records its pid.
      daemon_pid=$(cut -d' ' -f1 "/run/cellar/mount-$(realpath "$dir" | sed 's/%/%25/g; s|/|%2F|g').pid")
      ;;
    s3fs)
      # Foreground (-f) in our background, so we know the pid and can wait for it to exit.
      s3fs "$bucket:/${prefix:-s3fs}" "$dir" -f -o url="$endpoint" -o use_path_request_style \
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
      rclone_env rclone mount "rgw:$bucket/${prefix:-rclone}" "$dir" --vfs-cache-mode writes \
        --vfs-write-back 0s --cache-dir "$work/rclone-cache" --allow-other \
        --log-level INFO --log-file "$work/rclone.log" &
      wait_for_mount "$dir" "$!"
      # $! is the subshell running rclone_env; rclone itself is its child (env execs it).
      daemon_pid=$(pgrep -P "$!" -x rclone || echo "$!")
      ;;
  esac
}

daemon_hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$daemon_pid/status"; }   # KiB

unmount_system() { # system dir
  local s=$1 dir=$2 hwm
  [ "$s" = local ] && return 0
  # Peak resident memory of the daemon over this mount's life (a remount starts a new daemon).
  hwm=$(daemon_hwm)
  if [ "${hwm:-0}" -gt "${peak_rss[$s]:-0}" ]; then peak_rss[$s]=$hwm; fi
  case $s in
    cellar | cellar-pg) "$cellar" umount "$dir" ;;  # waits until the daemon has flushed and exited
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

# BENCH_PROFILE=<row>: `perf record` of the Cellar daemon while that row runs. DWARF call graphs:
# the release build has no frame pointers but keeps .eh_frame, which perf unwinds with. perf
# starts disabled and is enabled through its control fifo: its ack says it is attached to every
# thread of the daemon, so the row's first samples are not lost to perf's start.
profile_start() { # system row
  profile_pid=
  [ "$2" = "$profile_row" ] && is_cellar "$1" || return 0
  profile_out="$work/perf-$1-$2"
  rm -f "$profile_out.ctl" "$profile_out.ack"
  mkfifo "$profile_out.ctl" "$profile_out.ack"
  perf record -q -F "${BENCH_PROFILE_HZ:-199}" --call-graph "${BENCH_PROFILE_CALLGRAPH:-dwarf,16384}" \
    -D -1 --control "fifo:$profile_out.ctl,$profile_out.ack" \
    -p "$daemon_pid" -o "$profile_out.data" 2>>"$work/perf.log" &
  profile_pid=$!
  timeout 60 bash -c 'echo enable > "$1.ctl" && head -c 3 "$1.ack" > /dev/null' _ "$profile_out" ||
    log "   perf did not start (see perf.log)"
}

profile_stop() {
  [ -n "$profile_pid" ] || return 0
  kill -INT "$profile_pid"
  wait "$profile_pid" 2>/dev/null || true
  rm -f "$profile_out.ctl" "$profile_out.ack"
  perf report -i "$profile_out.data" --stdio --no-children --percent-limit 0.5 \
    > "$profile_out.txt" 2>>"$work/perf.log" || true
  perf script -i "$profile_out.data" 2>>"$work/perf.log" | python3 bench/rows.py fold > "$profile_out.folded"
  log "   profile: $profile_out.{data,txt,folded} (flamegraph.pl $profile_out.folded > flame.svg)"
  profile_pid=
}

# Runs one row's command under the row timeout; prints its seconds, `>N` if the timeout stopped
# it, `failed` otherwise. With --output, prints the command's last line of output instead of
# the seconds (rows that measure themselves: ttfb, fio).
run_row() { # system row [--output] command...
  local s=$1 row=$2 t0 t1 status=0 output=
  shift 2
  [ "$1" = --output ] && { output=1; shift; }
  profile_start "$s" "$row"
  t0=$(date +%s.%N)
  # bash -c: a row may be one of the functions exported below.
  timeout -k 10 "$row_timeout" bash -c '"$@"' "$row" "$@" > "$work/row.out" || status=$?
  [ "$status" = 0 ] && wait_until_stored "$s"
  t1=$(date +%s.%N)
  profile_stop
  if [ "$status" = 124 ]; then
    echo ">$row_timeout"
  elif [ "$status" != 0 ]; then
    log "   $row: $* failed with status $status"
    echo failed
  elif [ -n "$output" ]; then
    tail -n 1 "$work/row.out"
  else
    printf '%.6f\n' "$(echo "$t1 - $t0" | bc -l)"
  fi
}

# One row: runs it (unless skipped), logs it, and appends it to the results file.
row() { # system row kind label command...
  local s=$1 id=$2 kind=$3 label=$4 v
  shift 4
  if wants "$id"; then v=$(run_row "$s" "$id" "$@"); else v=skipped; fi
  log "   $(printf '%-7s' "$id") $v"
  printf '%s\t%s\t%s\t%s\t%s\n' "$s" "$id" "$v" "$kind" "$label" >> "$results"
}

fio_row() { # file json
  fio --name=randread --filename="$1" --rw=randread --bs=4k --size="${size_mb}M" \
    --ioengine=psync --runtime="$fio_seconds" --time_based --invalidate=1 \
    --output-format=json --output="$2" >/dev/null
  python3 bench/rows.py fio "$2"
}

pip_row() { # prefix
  env -u PIP_FIND_LINKS python3 -m pip install -q --no-index --no-deps --no-cache-dir \
    --disable-pip-version-check --root-user-action=ignore --prefix "$1" "$wheelhouse"/*.whl
}

# The setup of the ls -lR 100,000 row (not timed), bounded by BENCH_SETUP_TIMEOUT. Through the
# mount for local disk and Cellar (16 threads, each in its own directories). s3fs and rclone keep
# a file as one object of the same name, so one tree uploaded once straight to the bucket
# (rclone copy, 32 at once; about 450 objects/s here) serves both: their row mounts its prefix.
make_many() { # system dir
  local s=$1 dir=$2
  case $s in
    s3fs | rclone)
      [ ! -e "$work/many-failed" ] || return 1
      [ ! -e "$work/many-uploaded" ] || return 0
      python3 bench/rows.py mkfiles "$work/many-src/many" "$ls_files" "$ls_dirs" 16
      if rclone_env timeout -k 10 "$setup_timeout" rclone copy "$work/many-src" "rgw:$bucket/ls100k" \
          --transfers 32 --checkers 32; then
        touch "$work/many-uploaded"
      else
        touch "$work/many-failed"
        return 1
      fi
      ;;
    *) timeout -k 10 "$setup_timeout" python3 bench/rows.py mkfiles "$dir/many" "$ls_files" "$ls_dirs" 16 ;;
  esac
}

# The row timeout runs these in a child bash.
export size_mb fio_seconds wheelhouse work ls_files ls_dirs bucket endpoint
export -f fio_row pip_row

# Inputs, made once on local disk: a tarball of ~2,600 files and a git repository of ~5,000 files.
python3 bench/rows.py inputs "$work"
wheels=$(ls "$wheelhouse"/*.whl 2>/dev/null | wc -l)

# The physical limit of the cold read: one GET of the same number of bytes from the same RGW with
# curl, single stream, to /dev/null; the median of 3.
raw_get=-
if wants raw; then
  dd if=/dev/zero of="$work/raw.bin" bs=1M count="$size_mb" status=none
  s3_curl PUT raw/big -o /dev/null -T "$work/raw.bin"
  rm -f "$work/raw.bin"
  gets=()
  for _ in 1 2 3; do gets+=("$(s3_curl GET raw/big -o /dev/null -w '%{time_total}')"); done
  s3_curl DELETE raw/big -o /dev/null
  raw_get=$(printf '%s\n' "${gets[@]}" | sort -n | sed -n 2p)
  log "== raw GET of $size_mb MiB with curl: ${gets[*]} s (median $raw_get)"
fi

for s in "${systems[@]}"; do
  dir="$work/mnt-$s"
  mkdir -p "$dir"
  mnt[$s]=$dir
  mount_system "$s" "$dir"
  # Other processes on the machine skew a row: the load average says how busy it was.
  log "== $s (load average $(cut -d' ' -f1-3 /proc/loadavg), at $((SECONDS - started_at)) s)"
  row "$s" write s "write $size_mb MiB + fsync" \
    dd if=/dev/zero of="$dir/big" bs=1M count="$size_mb" conv=fsync status=none
  cold "$s" "$dir"
  row "$s" read s "cold read $size_mb MiB" dd if="$dir/big" of=/dev/null bs=1M status=none
  row "$s" warm s "warm re-read $size_mb MiB" dd if="$dir/big" of=/dev/null bs=1M status=none
  cold "$s" "$dir"
  row "$s" ttfb s "first 4 KiB at a random offset, cold (median of 5)" \
    --output python3 bench/rows.py ttfb "$dir/big" 5
  if wants fio; then cold "$s" "$dir"; fi
  row "$s" fio iops "random 4 KiB reads, ${fio_seconds} s, cold (IOPS, mean latency)" \
    --output fio_row "$dir/big" "$work/fio-$s.json"
  row "$s" untar s "untar 2,600 files + sync" sh -c "tar -xf '$work/tree.tar' -C '$dir' && sync"
  cold "$s" "$dir"
  row "$s" ls s "ls -lR 2,600 files (cold)" ls -lR "$dir/tree"
  # file:// makes git pack and transfer the objects, as a clone from a server does.
  row "$s" clone s "git clone 5,000 files" git clone -q "file://$work/repo" "$dir/repo"
  [ "$s" = local ] || log "   in the bucket under $s/: $(rclone_env rclone size "rgw:$bucket/$s" 2>&1 | tr '\n' ' ')"
  row "$s" rm s "rm -rf all (the rows above)" rm -rf "$dir/big" "$dir/tree" "$dir/repo"
  row "$s" pip s "pip install $wheels wheels (Django, Flask, ...; 8,600 files)" pip_row "$dir/env"
  row "$s" sqlite s "SQLite: $(commas "$sqlite_rows") inserts in $sqlite_txs transactions (WAL)" \
    python3 bench/rows.py sqlite "$dir/bench.db" "$sqlite_rows" "$sqlite_txs"
  if wants ls100k; then
    t0=$SECONDS
    if make_many "$s" "$dir" >&2; then
      log "   made $ls_files files in $((SECONDS - t0)) s (not timed)"
      if [ "$s" = s3fs ] || [ "$s" = rclone ]; then
        sync
        unmount_system "$s" "$dir"
        echo 3 > /proc/sys/vm/drop_caches
        prefix=ls100k mount_system "$s" "$dir"
      else
        cold "$s" "$dir"
      fi
      row "$s" ls100k s "ls -lR $(commas "$ls_files") files in $ls_dirs dirs (cold)" ls -lR "$dir/many"
    else
      log "   making $ls_files files took more than $setup_timeout s: row not run"
      printf '%s\tls100k\tsetup > %s s\ts\tls -lR %s files in %s dirs (cold)\n' "$s" "$setup_timeout" "$(commas "$ls_files")" "$ls_dirs" >> "$results"
    fi
  fi
  # What the rows left, but the many files (no data; deleting them would take long). The peers'
  # are deleted straight in the store.
  if [ "$s" = s3fs ] || [ "$s" = rclone ]; then
    unmount_system "$s" "$dir"
    rclone_env timeout -k 10 "$setup_timeout" rclone purge "rgw:$bucket/$s" --checkers 32 2>/dev/null || true
  else
    timeout -k 10 "$setup_timeout" rm -rf "$dir/env" "$dir"/bench.db* || log "   cleanup of $s stopped"
    unmount_system "$s" "$dir"
  fi
  mnt[$s]=
  if [ "$s" = local ]; then rss=–; else rss=$(( ${peak_rss[$s]:-0} / 1024 )); fi
  printf '%s\trss\t%s\tmib\tpeak RSS of the daemon (MiB)\n' "$s" "$rss" >> "$results"
done

# Memory while streaming: one daemon writes BENCH_STREAM_MB and reads it back (the page cache
# dropped in between, so the read goes through the daemon); its VmHWM is the peak. Last, when
# the other rows' files are gone from the RAM-backed store.
if wants stream; then
  for s in "${stream_systems[@]}"; do
    [[ " ${systems[*]} " == *" $s "* ]] || continue
    dir="$work/mnt-$s"
    mnt[$s]=$dir
    mount_system "$s" "$dir"
    log "== $s streaming $stream_mb MiB (load average $(cut -d' ' -f1-3 /proc/loadavg), at $((SECONDS - started_at)) s)"
    echo 5 > "/proc/$daemon_pid/clear_refs"   # VmHWM := the current RSS
    row "$s" stream-w s "stream $stream_mb MiB: write + fsync" \
      dd if=/dev/zero of="$dir/stream" bs=1M count="$stream_mb" conv=fsync status=none
    sync
    echo 3 > /proc/sys/vm/drop_caches
    row "$s" stream-r s "stream $stream_mb MiB: read back" dd if="$dir/stream" of=/dev/null bs=1M status=none
    printf '%s\tstream-rss\t%s\tmib\tpeak RSS while streaming %s MiB (MiB)\n' "$s" "$(( $(daemon_hwm) / 1024 ))" "$stream_mb" >> "$results"
    log "   peak RSS $(( $(daemon_hwm) / 1024 )) MiB"
    rm -f "$dir/stream"
    unmount_system "$s" "$dir"
    mnt[$s]=
  done
fi

# The table, as Markdown (bench/README.md keeps the latest one).
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r), RGW memstore on loopback, load average $(cut -d' ' -f1-3 /proc/loadavg), $(( (SECONDS - started_at) / 60 )) min"
echo
python3 bench/rows.py table "$results" "$raw_get"
[ "$raw_get" = - ] || printf '\nraw GET of the same %s MiB with curl (single stream, median of 3): %s s\n' "$size_mb" "$raw_get"
