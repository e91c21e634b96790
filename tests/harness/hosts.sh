#!/usr/bin/env bash
# Several "hosts" on this machine for the multi-host tests: each host is a network namespace
# (one veth on a bridge private to this run, nothing reachable beyond it), a mount namespace (its FUSE
# mounts are invisible to the other hosts and to this machine), a PID namespace (killing its init
# kills everything that runs on it at once, like a crashed machine) and a data directory.
#
#   hosts.sh start DIR N             make hosts 1..N; writes DIR/env (source it)
#   hosts.sh exec DIR I CMD...       run CMD on host I in the foreground; exits with its status
#   hosts.sh spawn DIR I NAME CMD... start CMD on host I in the background (its own session);
#                                    output in DIR/hostI/NAME.log, pid (as host I sees it) in
#                                    DIR/hostI/NAME.pid
#   hosts.sh kill DIR I              SIGKILL everything on host I (a host crash)
#   hosts.sh revive DIR I            a fresh init on host I after `kill` (same address, same data)
#   hosts.sh stop DIR                kill every host, remove the namespaces, veths and the bridge
#                                    (also after a failed or partial start)
#
# DIR/env exports HOSTS_N, HOSTS_ADDR (this machine's address on the bridge: make servers listen
# there), HOSTS_CIDR (HOSTS_ADDR/24, what a server must accept clients from) and HOST<I>_ADDR.
# Subnets (10.89.K.0/24) and interface names are unique per run, so concurrent runs never collide.
# On each host /run/cellar, /var/log/cellar and /var/lib/cellar are the host's own (under
# DIR/hostI), and TMPDIR is DIR/hostI/tmp. Needs root, iproute2, util-linux, python3.
set -euo pipefail

die() { echo "hosts.sh: $*" >&2; exit 1; }

readonly LOCK=/run/cellar-hosts.lock
readonly PRIVATE_DIRS="/run/cellar /var/log/cellar /var/lib/cellar"

netns_name() { echo "cellar-$(cat "$dir/tag")-$1"; }

# The host's init as this machine sees it: the process of the host's netns that is pid 1 of its
# own PID namespace.
init_pid() { # host
  local ns pid
  ns=$(netns_name "$1")
  for pid in $(ip netns pids "$ns" 2>/dev/null); do
    if grep -qE '^NSpid:[[:space:]]+[0-9]+[[:space:]]+1$' "/proc/$pid/status" 2>/dev/null; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# Runs inside the new namespaces as pid 1: private directories, then reap orphans forever (the
# daemons that double-fork end up as its children).
host_init() { # host
  local host_dir=$dir/host$1 d
  for d in $PRIVATE_DIRS; do
    mkdir -p "$host_dir/root$d"
    mount --bind "$host_dir/root$d" "$d"
  done
  exec python3 -c '
import os, time
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.5)
'
}

start_init() { # host
  local host=$1 ns
  ns=$(netns_name "$host")
  mkdir -p "$dir/host$host/tmp"
  for d in $PRIVATE_DIRS; do mkdir -p "$d"; done
  # ip netns exec gives a mount namespace that is a slave of this machine's; unshare makes the
  # host's own private one, with a /proc of its PID namespace.
  setsid ip netns exec "$ns" unshare --mount --propagation private --pid --fork --mount-proc \
    bash "$0" _init "$dir" "$host" </dev/null >>"$dir/host$host/init.log" 2>&1 &
  local deadline=$((SECONDS + 20))
  until init_pid "$host" >/dev/null; do
    ((SECONDS < deadline)) || die "host $host did not start (see $dir/host$host/init.log)"
    sleep 0.05
  done
  # The init is up once its private directories are mounted.
  until nsenter --target "$(init_pid "$host")" --mount --pid -- mountpoint -q /var/lib/cellar 2>/dev/null; do
    ((SECONDS < deadline)) || die "host $host did not mount its directories (see $dir/host$host/init.log)"
    sleep 0.05
  done
}

start() { # n
  local n=$1 tag k host br
  [[ $n =~ ^[1-9][0-9]?$ ]] || die "N must be 1..99"
  [ -e "$dir/tag" ] && die "$dir already holds hosts (stop them first)"
  mkdir -p "$dir"
  tag=$(python3 -c 'import secrets; print(secrets.token_hex(3))')
  echo "$tag" >"$dir/tag"
  br=cbr$tag
  # The subnet is picked and claimed (the bridge gets its address) under a machine-wide lock.
  exec 9>"$LOCK"
  flock 9
  for k in $(seq 0 255) none; do
    [ "$k" = none ] && die "no free subnet 10.89.K.0/24"
    ip -o -4 addr show | grep -q " 10\.89\.$k\." || break
  done
  ip link add "$br" type bridge
  ip addr add "10.89.$k.1/24" dev "$br"
  ip link set "$br" up
  exec 9>&-
  {
    echo "export HOSTS_N=$n"
    echo "export HOSTS_ADDR=10.89.$k.1"
    echo "export HOSTS_CIDR=10.89.$k.1/24"
  } >"$dir/env"
  for host in $(seq 1 "$n"); do
    local ns addr=10.89.$k.$((10 + host))
    ns=$(netns_name "$host")
    ip netns add "$ns"
    ip link add "cv${tag}h$host" type veth peer name "cv${tag}n$host"
    ip link set "cv${tag}h$host" master "$br" up
    ip link set "cv${tag}n$host" netns "$ns"
    ip -n "$ns" link set "cv${tag}n$host" name eth0
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # Sandbox networking (pasta) wants an interface with a default gateway; .254 is nobody, so
    # a packet for any other network finds no next hop and never leaves the hosts' network.
    ip -n "$ns" route add default via "10.89.$k.254" dev eth0
    start_init "$host"
    echo "export HOST${host}_ADDR=$addr" >>"$dir/env"
  done
  # Every host reaches this machine: a refused connection (nothing listens on port 9) proves it.
  for host in $(seq 1 "$n"); do
    ip netns exec "$(netns_name "$host")" python3 -c '
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        socket.create_connection((sys.argv[1], 9), timeout=1).close()
        break
    except ConnectionRefusedError:
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"hosts.sh: host {sys.argv[2]} cannot reach {sys.argv[1]}")
        time.sleep(0.1)
' "10.89.$k.1" "$host"
  done
  echo "hosts.sh: $n hosts on 10.89.$k.0/24 (this machine: 10.89.$k.1); env in $dir/env"
}

check_host() { # host
  [ -e "$dir/tag" ] || die "no hosts in $dir"
  [[ $1 =~ ^[0-9]+$ ]] && [ -d "$dir/host$1" ] || die "no host $1 in $dir"
}

enter() { # host cmd...
  local pid host=$1
  shift
  pid=$(init_pid "$host") || die "host $host is not running"
  exec nsenter --target "$pid" --net --mount --pid --wd="$PWD" -- \
    env TMPDIR="$dir/host$host/tmp" "$@"
}

kill_host() { # host
  local pid
  pid=$(init_pid "$1") || return 0
  kill -KILL "$pid"
  local deadline=$((SECONDS + 20))
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || die "host $1's init $pid survived SIGKILL"
    sleep 0.05
  done
  # The PID namespace is gone once its init is; wait for its last processes to be reaped.
  while init_pid "$1" >/dev/null || [ -n "$(ip netns pids "$(netns_name "$1")" 2>/dev/null)" ]; do
    ((SECONDS < deadline)) || die "processes of host $1 survived"
    for pid in $(ip netns pids "$(netns_name "$1")" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.05
  done
}

stop() {
  [ -e "$dir/tag" ] || return 0
  local tag host ns
  tag=$(cat "$dir/tag")
  for ns in $(ip netns list | awk -v p="cellar-$tag-" 'index($1, p) == 1 {print $1}'); do
    host=${ns##*-}
    kill_host "$host" || true
    ip netns del "$ns" 2>/dev/null || true
  done
  for link in $(ip -o link show | awk -F': ' -v p="cv$tag" 'index($2, p) == 1 {sub(/@.*/, "", $2); print $2}'); do
    ip link del "$link" 2>/dev/null || true
  done
  ip link del "cbr$tag" 2>/dev/null || true
  rm -f "$dir/tag"
}

[ $# -ge 2 ] || die "usage: hosts.sh start DIR N | exec DIR I CMD... | spawn DIR I NAME CMD... | kill DIR I | revive DIR I | stop DIR"
action=$1
dir=$(realpath -m "$2")
shift 2
case $action in
  start) [ $# -eq 1 ] || die "usage: hosts.sh start DIR N"; start "$1" ;;
  exec)
    [ $# -ge 2 ] || die "usage: hosts.sh exec DIR I CMD..."
    check_host "$1"
    enter "$@"
    ;;
  spawn)
    [ $# -ge 3 ] || die "usage: hosts.sh spawn DIR I NAME CMD..."
    check_host "$1"
    host=$1 name=$2
    shift 2
    [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad NAME $name"
    rm -f "$dir/host$host/$name.pid"
    # The inner shell records its pid as the host sees it, then becomes CMD.
    (enter "$host" setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/host$host/$name.pid" "$@" \
      </dev/null >>"$dir/host$host/$name.log" 2>&1 &)
    deadline=$((SECONDS + 20))
    until [ -s "$dir/host$host/$name.pid" ]; do
      ((SECONDS < deadline)) || die "$name did not start on host $host (see $dir/host$host/$name.log)"
      sleep 0.02
    done
    ;;
  kill) [ $# -eq 1 ] || die "usage: hosts.sh kill DIR I"; check_host "$1"; kill_host "$1" ;;
  revive)
    [ $# -eq 1 ] || die "usage: hosts.sh revive DIR I"
    check_host "$1"
    init_pid "$1" >/dev/null && die "host $1 is running"
    start_init "$1"
    ;;
  stop) [ $# -eq 0 ] || die "usage: hosts.sh stop DIR"; stop ;;
  _init) host_init "$1" ;;
  *) die "unknown action $action" ;;
esac
