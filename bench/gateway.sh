#!/usr/bin/env bash
# S3 gateway throughput: one 1 GiB object PUT and GET with `aws s3 cp` (multipart up, ranged
# parallel GETs down: the CLI's defaults) through `cellar server --s3-listen` and against the
# Ceph RGW it stores its blocks in (started here by tests/harness/rgw.sh), on loopback. Prints a
# Markdown table with seconds, MiB/s and the gateway/RGW ratio. Not a test: it asserts only that
# the copies come back equal.
#
#   bash bench/gateway.sh                  # needs radosgw (see bench/README.md) and curl
#   BENCH_GATEWAY_MB=256 bash bench/gateway.sh   # a smaller object (debugging)
#   BENCH_KEEP=1 ...                       # keep the work directory (server log) afterwards
#   CELLAR_BIN=target/debug/cellar ...     # the binary to measure (default: release build)
# The aws CLI is tests/fs/.venv's (made by tests/fs/gateway.py) if there is one, else the PATH's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
size_mb=${BENCH_GATEWAY_MB:-1024}
cellar=${CELLAR_BIN:-$root/target/release/cellar}
[ -x "$cellar" ] || cargo build --release -p cellar-cli
awscli=$root/tests/fs/.venv/bin/aws
[ -x "$awscli" ] || awscli=$(command -v aws) || { echo "gateway.sh: no aws CLI" >&2; exit 2; }
work=$(mktemp -d "${BENCH_WORK_PARENT:-/var/tmp}/cellar-bench-gateway.XXXXXX")
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

# Room for the object stored twice (RGW directly, Cellar's blocks) and RGW's delayed garbage.
export CELLAR_RGW_MEMSTORE_BYTES=$(( (size_mb * 3 + 2048) * 1024 * 1024 ))
bash tests/harness/rgw.sh start "$work/rgw" >&2
# shellcheck disable=SC1091
source "$work/rgw/env"
export AWS_DEFAULT_REGION=us-east-1 NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
# The CA variables this machine sets are for https; both endpoints here are plain http.
unset AWS_CA_BUNDLE SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE CURL_CA_BUNDLE
rgw_keys=("$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY")

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
s3_port=$(free_port)
"$cellar" server --listen "127.0.0.1:$port" --s3-listen "127.0.0.1:$s3_port" --data-dir "$work/server" \
  --no-embedded-runner --store "s3://cellar-test/cellar?endpoint=$CELLAR_TEST_S3_ENDPOINT&region=us-east-1" \
  >>"$work/server.log" 2>&1 &
server_pid=$!
key=$(server_bootstrap_key "$work/server.log" "$server_pid" "$port") \
  || { log "the server did not start; its log:"; sed -E 's/cellar_[0-9a-f]{64}/cellar_<redacted>/g' "$work/server.log" >&2; exit 1; }
api="http://127.0.0.1:$port/api"
printf 'Authorization: Bearer %s\n' "$key" > "$work/auth-header"
curl -sSf -H @"$work/auth-header" -H 'Content-Type: application/json' -d '{"name":"bench"}' "$api/volumes" >/dev/null
curl -sSf -H @"$work/auth-header" -H 'Content-Type: application/json' -d '{"expiresInSeconds":86400}' \
  "$api/volumes/bench/s3-credentials" > "$work/cred.json"
cred() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$work/cred.json" "$1"; }
gw_keys=("$(cred accessKeyId)" "$(cred secretAccessKey)")
gw_endpoint=$(cred endpoint)

log "== making ${size_mb} MiB of input"
head -c "$((size_mb << 20))" /dev/urandom > "$work/big"

declare -A secs
# One timed copy: endpoint, keys, arguments of `aws s3 cp`. The page cache is dropped first.
row() { # name endpoint access secret args...
  local name=$1 endpoint=$2 access=$3 secret=$4 t0 t1
  shift 4
  sync
  echo 3 > /proc/sys/vm/drop_caches
  log "== $name (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  t0=$(date +%s.%N)
  AWS_ACCESS_KEY_ID=$access AWS_SECRET_ACCESS_KEY=$secret \
    "$awscli" --endpoint-url "$endpoint" s3 cp --only-show-errors "$@"
  t1=$(date +%s.%N)
  secs[$name]=$(echo "$t1 - $t0" | bc -l)
  log "   ${secs[$name]} s"
}
same() { cmp -s "$1" "$2" || { log "$2 differs from $1"; exit 1; }; }

row "RGW PUT" "$CELLAR_TEST_S3_ENDPOINT" "${rgw_keys[@]}" "$work/big" s3://cellar-test/direct/big
row "RGW GET" "$CELLAR_TEST_S3_ENDPOINT" "${rgw_keys[@]}" s3://cellar-test/direct/big "$work/big.rgw"
same "$work/big" "$work/big.rgw"
rm -f "$work/big.rgw"
row "gateway PUT" "$gw_endpoint" "${gw_keys[@]}" "$work/big" s3://bench/big
# Cold: the server's block cache is 64 MiB, far less than the object.
row "gateway GET" "$gw_endpoint" "${gw_keys[@]}" s3://bench/big "$work/big.gw"
same "$work/big" "$work/big.gw"

rate() { echo "$size_mb / $1" | bc -l; }
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), ${size_mb} MiB object, aws s3 cp ($("$awscli" --version 2>&1 | cut -d' ' -f1)), RGW memstore on loopback, $("$cellar" --version)"
echo
echo "| ${size_mb} MiB object | RGW s | RGW MiB/s | gateway s | gateway MiB/s | gateway / RGW throughput |"
echo "|---|---:|---:|---:|---:|---:|"
for op in PUT GET; do
  r=${secs["RGW $op"]} g=${secs["gateway $op"]}
  printf '| %s | %.2f | %.0f | %.2f | %.0f | %.2f |\n' "$op" "$r" "$(rate "$r")" "$g" "$(rate "$g")" "$(echo "$r / $g" | bc -l)"
done
