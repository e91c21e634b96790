#!/usr/bin/env bash
# The README's first command: gives this machine what `cellar server` needs at run time (FUSE,
# bubblewrap, util-linux's nsenter and setpriv, the user-mode network stack pasta, iproute2),
# installing what is missing with apt-get, then builds and starts the server on its embedded
# default. Arguments go to `cellar server` (e.g. --listen 127.0.0.1:3986 --data-dir DIR).
#
#   bash scripts/start-server.sh [SERVER FLAGS...]
#
# Needs root (the runner mounts FUSE volumes and creates namespaces) and Rust (cargo). When
# something is missing and cannot be installed here (not root, no apt-get), says what and how,
# and exits 1. Does nothing but the build when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

me=scripts/start-server.sh
# Where the runner and the sandboxes look programs up, whatever the caller's PATH (the same
# directories `cellar server` checks at start).
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Run-time programs and the Debian package of each.
declare -A PACKAGE_OF=(
  [fusermount3]=fuse3 [bwrap]=bubblewrap [nsenter]=util-linux [setpriv]=util-linux
  [pasta]=passt [ip]=iproute2
)
PROGRAMS=(fusermount3 bwrap nsenter setpriv pasta ip)

# An executable file, not just any (bash's `command -v` also reports files it cannot run).
have() {
  local dir
  for dir in ${SYSTEM_PATH//:/ }; do
    [ -f "$dir/$1" ] && [ -x "$dir/$1" ] && return 0
  done
  return 1
}
is_root() { [ "$(id -u)" -eq 0 ]; }

# Sets `missing` (what is absent) and `packages` (what provides it).
find_missing() {
  missing=() packages=()
  local program package
  for program in "${PROGRAMS[@]}"; do
    have "$program" && continue
    missing+=("$program")
    package=${PACKAGE_OF[$program]}
    [[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
  done
  # Build-time: the crates compile C code (SQLite, the TLS library).
  if ! command -v cc >/dev/null; then
    missing+=(cc)
    packages+=(build-essential)
  fi
  if [ ! -e /dev/fuse ] && ! have modprobe; then
    missing+=(modprobe)
    packages+=(kmod)
  fi
}

command -v cargo >/dev/null || {
  echo "$me: cargo is missing: install Rust 1.95 or newer (https://rustup.rs)" >&2
  exit 1
}

find_missing
if [ ${#packages[@]} -gt 0 ]; then
  if ! is_root || ! have apt-get; then
    echo "$me: missing: ${missing[*]}" >&2
    if have apt-get; then
      echo "  install them as root: apt-get install ${packages[*]}  (or run $me as root)" >&2
    else
      echo "  install the packages that provide them (on Debian/Ubuntu: ${packages[*]})" >&2
    fi
    exit 1
  fi
  echo "$me: installing ${packages[*]} (for ${missing[*]})" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -q --no-install-recommends "${packages[@]}" </dev/null; }
  # The package lists are fetched only when a package is unknown or they are out of date.
  unknown=0
  for package in "${packages[@]}"; do
    apt-cache show "$package" >/dev/null 2>&1 || unknown=1
  done
  if [ $unknown -eq 1 ] || ! apt_install; then
    apt-get update -q </dev/null
    apt_install
  fi
  find_missing
  if [ ${#missing[@]} -gt 0 ]; then
    echo "$me: still missing after installing ${packages[*]}: ${missing[*]}" >&2
    exit 1
  fi
fi

if [ ! -e /dev/fuse ]; then
  if is_root; then modprobe fuse 2>/dev/null || true; fi
  if [ ! -e /dev/fuse ]; then
    echo "$me: /dev/fuse is missing: load the fuse module as root (modprobe fuse), or run the" \
      "container with --device /dev/fuse" >&2
    exit 1
  fi
fi

if ! is_root; then
  echo "$me: cellar server runs as root (the runner mounts FUSE volumes and creates namespaces):" \
    "run $me as root" >&2
  exit 1
fi

exec cargo run --release --locked -p cellar-cli -- server "$@"
