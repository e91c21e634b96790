# Sourced by the scripts in tests/ that run by hand: `own_rgw NAME` starts a Ceph RGW for this
# shell (stopped when it exits) and sources its env file, unless CELLAR_TEST_S3_URL is set.
# shellcheck shell=bash
own_rgw() { # name
  [[ -z ${CELLAR_TEST_S3_URL:-} ]] || return 0
  rgw_dir=$(mktemp -d "/tmp/cellar-$1-rgw-XXXXXX")
  trap 'bash tests/harness/rgw.sh stop "$rgw_dir"; rm -rf "$rgw_dir"' EXIT
  bash tests/harness/rgw.sh start "$rgw_dir"
  # shellcheck disable=SC1091
  source "$rgw_dir/env"
}
