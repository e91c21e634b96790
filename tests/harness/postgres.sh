#!/usr/bin/env bash
# A throw-away PostgreSQL for the tests: `initdb` and `postgres` from Debian's `postgresql`
# package, run as the unprivileged user `postgres` on a free loopback port, data in DIR.
#
#   bash tests/harness/postgres.sh start DIR [--listen ADDR/PREFIX]
#   bash tests/harness/postgres.sh stop DIR
#
# DIR/env (mode 0600) holds NAME=VALUE lines (read them, or `set -a; source DIR/env; set +a`):
# CELLAR_TEST_POSTGRES_URL=postgres://cellar:PASS@127.0.0.1:PORT/postgres.
# --listen also listens on ADDR (an address of this machine, e.g. the host side of the network of
# tests/harness/hosts.sh), accepts password logins from ADDR/PREFIX, and adds
# CELLAR_TEST_POSTGRES_HOSTS_URL (the same database through ADDR) to DIR/env.
# The password is random and only ever written to DIR/env: never to a log or a command line.
set -euo pipefail

action=${1:?start or stop}
dir=${2:?a directory}
shift 2
listen=
while [ $# -gt 0 ]; do
    case $1 in
    --listen) listen=${2:?--listen ADDR/PREFIX}; shift 2 ;;
    *) echo "postgres.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[[ -x $bin/postgres ]] || { echo "postgres.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
run_as() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

case $action in
start)
    addresses=127.0.0.1
    if [ -n "$listen" ]; then
        [[ $listen =~ ^([0-9.]+)/([0-9]+)$ ]] || { echo "postgres.sh: --listen wants ADDR/PREFIX, got $listen" >&2; exit 2; }
        extra_addr=${BASH_REMATCH[1]}
        addresses="127.0.0.1,$extra_addr"
    fi
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    run_as test -w "$dir" || { echo "postgres.sh: user postgres cannot write $dir (is every parent directory searchable?)" >&2; exit 1; }
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    (umask 077; printf '%s\n' "$password" >"$dir/.pw")
    chown postgres:postgres "$dir/.pw"
    run_as "$bin/initdb" -D "$dir/data" -U cellar --pwfile="$dir/.pw" -A scram-sha-256 -E UTF8 >"$dir/initdb.log"
    rm -f "$dir/.pw"
    if [ -n "$listen" ]; then
        # Clients in the namespaces connect from ADDR's subnet; the password is still required.
        echo "host all all $listen scram-sha-256" >>"$dir/data/pg_hba.conf"
    fi
    run_as "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-c listen_addresses=$addresses -p $port -c unix_socket_directories=$dir -c max_connections=300 -c fsync=off" start >/dev/null
    (
        umask 077
        {
            echo "CELLAR_TEST_POSTGRES_URL=postgres://cellar:$password@127.0.0.1:$port/postgres"
            [ -z "$listen" ] || echo "CELLAR_TEST_POSTGRES_HOSTS_URL=postgres://cellar:$password@$extra_addr:$port/postgres"
        } >"$dir/env"
    )
    echo "postgres.sh: PostgreSQL ready on $addresses port $port; env in $dir/env"
    ;;
stop)
    [[ -d $dir/data ]] && run_as "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    ;;
*)
    echo "postgres.sh: unknown action $action" >&2
    exit 2
    ;;
esac
