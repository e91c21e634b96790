# Shared by the suites that run a real `cellar server` (tests/compat/run.sh, tests/api/fuzz.sh).
# Source it; every function takes the server's data directory, log or PID as arguments.

# PIDs of processes whose command line names the data directory (its sandboxes and mounts).
server_processes() { # data_dir
    local proc
    for proc in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$proc/cmdline" | grep -qF -- "$1/" && echo "${proc#/proc/}"
    done
    return 0
}

# Waits for the first start's bootstrap key (`cellar_` and 64 hex digits) in the log and for the
# API to accept it; prints the key. Fails if the server exits or 30 s pass.
server_bootstrap_key() { # log pid port
    local key=
    for _ in $(seq 1 300); do
        kill -0 "$2" 2>/dev/null || return 1
        key=${key:-$(grep -oE 'cellar_[0-9a-f]{64}' "$1" | head -n 1 || true)}
        if [[ -n $key ]] && curl -sf -o /dev/null -H "Authorization: Bearer $key" \
            "http://127.0.0.1:$3/api/volumes"; then
            echo "$key"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Stops the server (TERM, then KILL after 10 s).
server_stop() { # pid
    kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1"
    for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$1" 2>/dev/null && kill -KILL "$1"
    wait "$1" 2>/dev/null || true
}

# Whatever outlived the server: sandboxes first (a PID namespace's init ignores SIGTERM), then
# the FUSE mount processes, then any mount point left under the data directory.
server_end_leftovers() { # data_dir
    local leftovers pid
    leftovers=$(server_processes "$1")
    if [[ -n $leftovers ]]; then
        echo "$(wc -w <<<"$leftovers") process(es) of this run outlived the server; ending them" >&2
        for pid in $leftovers; do
            [[ $(cat "/proc/$pid/comm" 2>/dev/null) == bwrap ]] && kill -KILL "$pid" 2>/dev/null
        done
        sleep 1
        for pid in $(server_processes "$1"); do kill -TERM "$pid" 2>/dev/null; done
        sleep 2
        for pid in $(server_processes "$1"); do kill -KILL "$pid" 2>/dev/null; done
    fi
    awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
        fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    done
}
