#!/usr/bin/env bash
# A throw-away PostgreSQL for the tests: `initdb` and `postgres` from Debian's `postgresql`
# package, run as the unprivileged user `postgres` on a free loopback port, data in DIR.
#
#   bash tests/harness/postgres.sh start DIR    writes DIR/env (CELLAR_TEST_POSTGRES_URL=...)
#   bash tests/harness/postgres.sh stop DIR
set -euo pipefail

action=${1:?start or stop}
dir=${2:?a directory}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[[ -x $bin/postgres ]] || { echo "postgres.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
run_as() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

case $action in
start)
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    printf '%s\n' "$password" >"$dir/.pw"
    chown postgres:postgres "$dir/.pw"
    run_as "$bin/initdb" -D "$dir/data" -U cellar --pwfile="$dir/.pw" -A scram-sha-256 -E UTF8 >"$dir/initdb.log"
    rm -f "$dir/.pw"
    run_as "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c max_connections=300 -c fsync=off" start >/dev/null
    echo "CELLAR_TEST_POSTGRES_URL=postgres://cellar:$password@127.0.0.1:$port/postgres" >"$dir/env"
    chmod 600 "$dir/env"
    ;;
stop)
    [[ -d $dir/data ]] && run_as "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    ;;
*)
    echo "postgres.sh: unknown action $action" >&2
    exit 2
    ;;
esac
