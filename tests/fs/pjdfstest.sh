#!/usr/bin/env bash
# pjdfstest (the Rust rewrite) as root in a directory on a fresh mount. Every failure must be
# listed, with its reason, under "## pjdfstest exceptions" in docs/SEMANTICS.md.
source "$(dirname "$0")/../harness/suite.sh"

exceptions_file="$REPO_DIR/docs/SEMANTICS.md"
[ "$(id -u)" = 0 ] || fail "pjdfstest must run as root (it switches users and changes owners)"
command -v pjdfstest >/dev/null || fail "pjdfstest is not installed (cargo install pjdfstest --locked)"

mkdir "$MNT/p" "$WORK/secondary"
# pjdfstest switches to unprivileged users, who must reach its directories (mktemp makes 0700).
chmod 0755 "$WORK" "$WORK/v" "$MNT/p" "$WORK/secondary"
runuser -u nobody -- test -x "$MNT/p" ||
  fail "user nobody cannot reach $MNT/p: make its parent directories world-searchable (chmod o+x)"
note "running pjdfstest in $MNT/p"
# A broken file system can hang a test; the timeout turns that into a failure.
set +e
(cd "$MNT/p" && NO_COLOR=1 timeout 1800 pjdfstest -c "$REPO_DIR/tests/fs/pjdfstest.toml" \
  -p "$MNT/p" -s "$WORK/secondary") > "$WORK/pjdfstest.out" 2>&1
status=$?
set -e
summary=$(grep -E '^Summary:' "$WORK/pjdfstest.out" || true)
[ -n "$summary" ] || fail "pjdfstest exited $status without a summary: $(tail -n 20 "$WORK/pjdfstest.out")"
note "$summary"

# Test names listed as exceptions: `module::test` names quoted anywhere in the exceptions section.
expected=$(awk '/^## /{section = ($0 ~ /^## pjdfstest exceptions/)} section' "$exceptions_file" |
  grep -oE '`[A-Za-z0-9_]+(::[A-Za-z0-9_]+)+`' | tr -d '`' | sort -u || true)
failed=$(grep -E '[[:space:]]FAILED$' "$WORK/pjdfstest.out" | awk '{print $1}' | sort -u || true)
unexpected=$(comm -23 <(printf '%s\n' "$failed" | sed '/^$/d') <(printf '%s\n' "$expected" | sed '/^$/d'))
stale=$(comm -13 <(printf '%s\n' "$failed" | sed '/^$/d') <(printf '%s\n' "$expected" | sed '/^$/d'))

if [ -n "$failed" ]; then
  note "failures (with their messages):"
  grep -A3 -E '[[:space:]]FAILED$' "$WORK/pjdfstest.out" | sed 's/^/  /' | head -n 200
fi
[ -z "$stale" ] || note "listed as exceptions but passed now (remove them from docs/SEMANTICS.md): $(echo $stale)"
[ -z "$unexpected" ] || fail "failures not listed in docs/SEMANTICS.md: $(echo $unexpected)"
[ "$status" = 0 ] || [ -n "$failed" ] || fail "pjdfstest exited $status"
note "ok (all failures are documented exceptions)"
