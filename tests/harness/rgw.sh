#!/usr/bin/env bash
# Single-node Ceph RGW for tests: one monitor, one in-memory (memstore) OSD, one radosgw, all on
# loopback, all state under one directory.
#
#   rgw.sh start DIR [--listen ADDR]   start the cluster, create a user and the bucket
#                                      `cellar-test`, write DIR/env
#   rgw.sh stop DIR                    stop the daemons (by their pid files; SIGKILL if they linger)
#
# DIR/env exports CELLAR_TEST_S3_URL, CELLAR_TEST_S3_ENDPOINT, AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY; source it. Several clusters may run at once (every port is picked free).
# --listen: radosgw also listens on ADDR (an address of this machine, e.g. the host side of the
# network of tests/harness/hosts.sh, same port), and DIR/env also exports CELLAR_TEST_S3_HOSTS_URL.
# CELLAR_RGW_MEMSTORE_BYTES sizes the RAM-backed OSD (default 6 GiB): a full OSD makes PUTs hang.
# Needs: radosgw ceph-mon ceph-osd ceph-common curl python3.
set -euo pipefail

readonly BUCKET=cellar-test
readonly REGION=us-east-1

exec 9>&2 # die reports on the caller's stderr even where a probe's output is discarded
die() { echo "rgw.sh: $*" >&9; exit 1; }

# A free port below the kernel's ephemeral range: a port bind(0) hands out is free only until the
# next outgoing connection takes it as its source port (the daemons make many before radosgw
# binds its port), and a radosgw that cannot bind exits.
free_port() {
  python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for port in random.sample(range(10000, low), 200):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(port)
    break
else:
    raise SystemExit("no free port below the ephemeral range")
'
}

random_string() { # length, alphabet
  python3 -c 'import secrets, sys; n, a = int(sys.argv[1]), sys.argv[2]; print("".join(secrets.choice(a) for _ in range(n)))' "$1" "$2"
}

# Signed S3 request with curl's built-in SigV4 (curl 7.88 does not send the payload hash header RGW
# requires, so it is given explicitly). AWS_CA_BUNDLE does not apply to curl.
s3_curl() { # method path [curl args...]
  local method=$1 path=$2
  shift 2
  curl -sS -o /dev/null -w '%{http_code}' --max-time 20 -X "$method" \
    --aws-sigv4 "aws:amz:${REGION}:s3" --user "${access_key}:${secret_key}" \
    -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
    "$@" "${endpoint}/${path}"
}

ceph_cli() { timeout 60 ceph -c "$conf" --connect-timeout 30 "$@"; }

write_conf() { # mon_port rgw_port
  local mem_bytes=${CELLAR_RGW_MEMSTORE_BYTES:-6442450944}
  cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = 127.0.0.1:$1
auth cluster required = none
auth service required = none
auth client required = none
ms bind ipv4 = true
ms bind ipv6 = false
public network = 127.0.0.0/8
# With auth none only crc framing works; radosgw otherwise insists on secure mode towards the mon.
ms cluster mode = crc
ms service mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms mon client mode = crc
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
osd crush chooseleaf type = 0
run dir = $dir/run
crash dir = $dir/crash
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
keyring = $dir/keyring

[mon]
mon data = $dir/mon/\$id

[osd]
osd data = $dir/osd/\$id
osd objectstore = memstore
memstore device bytes = $mem_bytes
osd journal size = 0

[client.rgw]
rgw data = $dir/rgw
rgw frontends = beast endpoint=127.0.0.1:$2${listen:+ endpoint=$listen:$2}
rgw gc obj min wait = 5
rgw gc processor period = 5
rgw gc processor max time = 5
rgw gc max concurrent io = 10
# Resharding a bucket index blocks writes with 503 SlowDown for as long as it takes; suites that
# write 100,000s of objects would trigger it. A fixed shard count avoids it.
rgw dynamic resharding = false
rgw override bucket index max shards = 32
EOF
}

wait_for() { # seconds description command...
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what (logs: $dir/log)"
    sleep 0.5
  done
}

# radosgw up and answering; a radosgw that exited is reported at once, with the end of its log.
rgw_answers() { # url
  pgrep -f "^radosgw -c $conf " >/dev/null ||
    die "radosgw exited: $(tail -n 5 "$dir/log/client.rgw.log" 2>/dev/null)"
  curl -sS -o /dev/null --max-time 2 "$1"
}

# Ceph daemons fork into the background: keep their stdio off the caller's pipes.
start_daemon() { # command args...
  "$1" -c "$conf" "${@:2}" </dev/null >>"$dir/log/daemons.out" 2>&1 9>&- ||
    die "$1 failed to start: $(tail -n 5 "$dir/log/daemons.out")"
}

put_works() { [ "$(s3_curl PUT "$BUCKET/.rgw-harness-probe" --data-binary probe)" = 200 ]; }

osd_up() { ceph_cli osd stat --format json | grep -q '"num_up_osds":1'; }

start() {
  [ -e "$dir/run/client.rgw.pid" ] && die "$dir already holds a cluster (stop it first)"
  mkdir -p "$dir"/{run,crash,log,mon/a,osd/0,rgw}
  local mon_port rgw_port started=$SECONDS
  mon_port=$(free_port)
  rgw_port=$(free_port)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  endpoint="http://127.0.0.1:${rgw_port}"
  write_conf "$mon_port" "$rgw_port"

  monmaptool --create --add a "127.0.0.1:${mon_port}" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap"
  start_daemon ceph-mon -i a
  local osd_id
  osd_id=$(ceph_cli osd create)
  [ "$osd_id" = 0 ] || die "expected osd id 0, got '$osd_id'"
  ceph-osd -c "$conf" -i 0 --mkfs 2>"$dir/log/osd-mkfs.err" || die "ceph-osd --mkfs failed: $(cat "$dir/log/osd-mkfs.err")"
  # memstore frees deleted objects, but glibc keeps the memory in per-thread arenas: with two
  # arenas the OSD's resident size stays close to what it stores.
  MALLOC_ARENA_MAX=2 start_daemon ceph-osd -i 0
  wait_for 60 "the OSD to come up" osd_up
  start_daemon radosgw -n client.rgw

  access_key=$(random_string 20 ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789)
  secret_key=$(random_string 40 abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789)
  # radosgw-admin echoes the keys as JSON: keep that out of the logs.
  timeout 120 radosgw-admin -c "$conf" user create --uid=cellar-test --display-name="Cellar tests" \
    --access-key="$access_key" --secret-key="$secret_key" >/dev/null
  # Its first start creates its pools, which takes a minute or more on a loaded machine.
  wait_for 180 "radosgw to listen on port $rgw_port" rgw_answers "$endpoint/"
  local status
  status=$(s3_curl PUT "$BUCKET")
  [ "$status" = 200 ] || die "creating bucket $BUCKET returned HTTP $status"
  wait_for 120 "a PUT into $BUCKET to succeed" put_works
  s3_curl DELETE "$BUCKET/.rgw-harness-probe" >/dev/null

  umask 077
  cat > "$dir/env" <<EOF
export CELLAR_TEST_S3_URL='s3://${BUCKET}?endpoint=${endpoint}&region=${REGION}'
export CELLAR_TEST_S3_ENDPOINT='${endpoint}'
export AWS_ACCESS_KEY_ID='${access_key}'
export AWS_SECRET_ACCESS_KEY='${secret_key}'
EOF
  if [ -n "$listen" ]; then
    echo "export CELLAR_TEST_S3_HOSTS_URL='s3://${BUCKET}?endpoint=http://${listen}:${rgw_port}&region=${REGION}'" >>"$dir/env"
    wait_for 30 "radosgw to listen on $listen:$rgw_port" rgw_answers "http://$listen:$rgw_port/"
  fi
  echo "rgw.sh: RGW ready at $endpoint (bucket $BUCKET) in $((SECONDS - started))s; env in $dir/env"
}

stop_daemon() { # pid file
  local pid_file=$1 pid
  [ -f "$pid_file" ] || return 0
  pid=$(cat "$pid_file")
  rm -f "$pid_file"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  [ -d "$dir/run" ] || return 0
  stop_daemon "$dir/run/client.rgw.pid"
  stop_daemon "$dir/run/osd.0.pid"
  stop_daemon "$dir/run/mon.a.pid"
}

usage="usage: rgw.sh start DIR [--listen ADDR] | rgw.sh stop DIR"
[ $# -eq 2 ] || { [ $# -eq 4 ] && [ "$1" = start ] && [ "$3" = --listen ]; } || die "$usage"
listen=${4:-}
dir=$(realpath -m "$2")
conf="$dir/ceph.conf"
case "$1" in
  start) start ;;
  stop) stop ;;
  *) die "$usage" ;;
esac
