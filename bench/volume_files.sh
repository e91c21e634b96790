#!/usr/bin/env bash
# Volume file transfers without a sandbox: a 2 GiB file up and down through the file API (curl)
# and through `cellar volume put/get`, against a local `cp` and against `aws s3 cp` of the same
# file to the same S3 server (a Ceph RGW started here by tests/harness/rgw.sh); then a tree of
# 1,000 small files with `cellar volume put/get` against `aws s3 cp --recursive`. Prints a
# Markdown table: seconds, MiB/s, ratios, the server's peak RSS during each transfer and the
# client's. Not a test: it asserts nothing but that every copy came back equal.
#
#   bash bench/volume_files.sh                  # needs radosgw (see bench/README.md), awscli, curl
#   BENCH_FILES_MB=256 bash bench/volume_files.sh   # a smaller big file (debugging)
#   BENCH_KEEP=1 ...                            # keep the work directory (server log) afterwards
#   CELLAR_BIN=target/debug/cellar ...          # the binary to measure (default: release build)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
size_mb=${BENCH_FILES_MB:-2048}
cellar=${CELLAR_BIN:-$root/target/release/cellar}
[ -x "$cellar" ] || cargo build --release -p cellar-cli
command -v aws >/dev/null || { echo "volume_files.sh: no aws: pip install awscli" >&2; exit 2; }
work=$(mktemp -d "${BENCH_WORK_PARENT:-/var/tmp}/cellar-bench-files.XXXXXX")
bucket=cellar-test
server_pid=
# shellcheck source=../tests/harness/server.sh
source tests/harness/server.sh

log() { printf '%s\n' "$*" >&2; }

cleanup() {
  set +e
  [ -n "$server_pid" ] && server_stop "$server_pid"
  bash tests/harness/rgw.sh stop "$work/rgw" >/dev/null 2>&1
  if [ -n "${BENCH_KEEP:-}" ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

# Room for the largest moment: one big file stored through Cellar, one through aws, and the
# garbage RGW keeps for a while after a delete.
export CELLAR_RGW_MEMSTORE_BYTES=$(( (size_mb * 3 + 2048) * 1024 * 1024 ))
bash tests/harness/rgw.sh start "$work/rgw" >&2
# shellcheck disable=SC1091
source "$work/rgw/env"
endpoint=$CELLAR_TEST_S3_ENDPOINT
export AWS_DEFAULT_REGION=us-east-1 NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
# The CA variables this machine sets are for https; the RGW here is plain http.
unset AWS_CA_BUNDLE SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE CURL_CA_BUNDLE
s3="aws --endpoint-url $endpoint s3"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_server() {
  "$cellar" server --listen "127.0.0.1:$port" --data-dir "$work/server" --no-embedded-runner \
    --store "s3://$bucket/cellar?endpoint=$endpoint&region=us-east-1" >>"$work/server.log" 2>&1 &
  server_pid=$!
}
start_server
key=$(server_bootstrap_key "$work/server.log" "$server_pid" "$port") \
  || { log "the server did not start; its log:"; sed -E 's/cellar_[0-9a-f]{64}/cellar_<redacted>/g' "$work/server.log" >&2; exit 1; }
api="http://127.0.0.1:$port/api"
# The key goes to curl in a file and to cellar in the environment: never on a command line.
printf 'Authorization: Bearer %s\n' "$key" > "$work/auth-header"
export CELLAR_API_URL=$api CELLAR_API_KEY=$key
# Cold reads: a fresh server process has none of the volume's blocks cached.
restart_server() {
  server_stop "$server_pid"
  start_server
  for _ in $(seq 300); do
    curl -sf -o /dev/null -H @"$work/auth-header" "$api/volumes" && return 0
    sleep 0.1
  done
  log "the server did not come back"; exit 1
}
"$cellar" volume create bench >/dev/null

# Inputs on local disk: the big file (random bytes) and 1,000 files of source-like sizes in
# 50 directories (log-normal, median ~1.8 KB, at most 200 KB).
log "== making ${size_mb} MiB of input"
head -c "$((size_mb << 20))" /dev/urandom > "$work/big"
python3 - "$work/tree" <<'PY'
import os, random, sys
rnd = random.Random(42)
for i in range(1000):
    d = os.path.join(sys.argv[1], f"pkg{i % 5}", f"mod{i % 50}")
    os.makedirs(d, exist_ok=True)
    size = int(rnd.lognormvariate(7.5, 1.3)) % 200_000
    with open(os.path.join(d, f"file{i}.py"), "wb") as f:
        f.write(rnd.randbytes(size))
PY
sync

declare -A secs server_rss client_rss
# Runs a row: its seconds, the server's peak RSS during it (VmHWM after resetting it) and the
# client's (GNU time). The page cache is dropped first, so every row reads its input from disk.
row() { # name command...
  local name=$1 t0 t1
  shift
  sync
  echo 3 > /proc/sys/vm/drop_caches
  echo 5 > "/proc/$server_pid/clear_refs"   # resets VmHWM to the current RSS
  log "== $name (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  t0=$(date +%s.%N)
  /usr/bin/time -f %M -o "$work/time" "$@" >/dev/null
  t1=$(date +%s.%N)
  secs[$name]=$(echo "$t1 - $t0" | bc -l)
  server_rss[$name]=$(( $(awk '/^VmHWM:/ {print $2}' "/proc/$server_pid/status") / 1024 ))
  client_rss[$name]=$(( $(tail -n 1 "$work/time") / 1024 ))
  log "   ${secs[$name]} s"
}
same() { # a b: the copy came back equal (not timed)
  cmp -s "$1" "$2" || { log "$2 differs from $1"; exit 1; }
}

row "local cp + sync" sh -c "cp '$work/big' '$work/big.cp' && sync"
rm -f "$work/big.cp"
row "aws s3 cp up" $s3 cp --only-show-errors "$work/big" "s3://$bucket/aws/big"
row "aws s3 cp down" $s3 cp --only-show-errors "s3://$bucket/aws/big" "$work/big.aws"
same "$work/big" "$work/big.aws"
rm -f "$work/big.aws"
$s3 rm --only-show-errors "s3://$bucket/aws/big"

row "API PUT (curl)" curl -sSf -H @"$work/auth-header" -T "$work/big" \
  "$api/volumes/bench/files/content?path=/big-api&overwrite=true"
restart_server
row "API GET (curl)" curl -sSf -H @"$work/auth-header" -o "$work/big.api" \
  "$api/volumes/bench/files/content?path=/big-api"
same "$work/big" "$work/big.api"
rm -f "$work/big.api"
"$cellar" volume rm bench:/big-api

row "cellar volume put" "$cellar" volume put --quiet "$work/big" bench:/big-cli
restart_server
row "cellar volume get" "$cellar" volume get --quiet bench:/big-cli "$work/big.cli"
same "$work/big" "$work/big.cli"
rm -f "$work/big.cli"
"$cellar" volume rm bench:/big-cli

row "tree: aws s3 cp --recursive up" $s3 cp --only-show-errors --recursive "$work/tree" "s3://$bucket/aws/tree"
row "tree: cellar volume put" "$cellar" volume put --quiet "$work/tree" bench:/
row "tree: aws s3 cp --recursive down" $s3 cp --only-show-errors --recursive "s3://$bucket/aws/tree" "$work/tree.aws"
restart_server
row "tree: cellar volume get" "$cellar" volume get --quiet bench:/tree "$work/tree.cellar"
diff -r "$work/tree" "$work/tree.aws" >/dev/null && diff -r "$work/tree" "$work/tree.cellar" >/dev/null \
  || { log "a downloaded tree differs"; exit 1; }

rate() { echo "$size_mb / $1" | bc -l; }
ratio() { echo "$1 / $2" | bc -l; }
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), ${size_mb} MiB file, RGW memstore on loopback, $("$cellar" --version)"
echo
echo "| ${size_mb} MiB file | seconds | MiB/s | × local cp | × aws s3 cp | server peak RSS (MiB) | client peak RSS (MiB) |"
echo "|---|---:|---:|---:|---:|---:|---:|"
base=${secs["local cp + sync"]}
for name in "local cp + sync" "aws s3 cp up" "API PUT (curl)" "cellar volume put" \
  "aws s3 cp down" "API GET (curl)" "cellar volume get"; do
  s=${secs[$name]}
  case $name in
    *up|*PUT*|*put) aws=${secs["aws s3 cp up"]} ;;
    *down|*GET*|*get) aws=${secs["aws s3 cp down"]} ;;
    *) aws= ;;
  esac
  server=–
  case $name in API*|cellar*) server=${server_rss[$name]} ;; esac
  printf '| %s | %.2f | %.0f | %.1f× | %s | %s | %s |\n' "$name" "$s" "$(rate "$s")" "$(ratio "$s" "$base")" \
    "$([ -n "$aws" ] && printf '%.2f×' "$(ratio "$s" "$aws")" || echo –)" "$server" "${client_rss[$name]}"
done
echo
echo "| 1,000 files ($(du -sh --apparent-size "$work/tree" | cut -f1)) | seconds | × aws s3 cp --recursive | server peak RSS (MiB) | client peak RSS (MiB) |"
echo "|---|---:|---:|---:|---:|"
for pair in "up:aws s3 cp --recursive up" "up:cellar volume put" "down:aws s3 cp --recursive down" "down:cellar volume get"; do
  dir=${pair%%:*}
  name="tree: ${pair#*:}"
  s=${secs[$name]}
  if [ "$dir" = up ]; then aws=${secs["tree: aws s3 cp --recursive up"]}; else aws=${secs["tree: aws s3 cp --recursive down"]}; fi
  server=–
  case $name in *cellar*) server=${server_rss[$name]} ;; esac
  printf '| %s | %.2f | %.1f× | %s | %s |\n' "${pair#*:}" "$s" "$(ratio "$s" "$aws")" "$server" "${client_rss[$name]}"
done
