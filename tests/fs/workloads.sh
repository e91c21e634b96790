#!/usr/bin/env bash
# Real workloads on a fresh mount: git clone of a generated repository (> 1,000 files, some
# binary) + git fsck + clean status (also after a remount); a venv + pip install + import;
# several processes writing one SQLite database at once (rollback journal and WAL).
source "$(dirname "$0")/../harness/suite.sh"

export GIT_CONFIG_NOSYSTEM=1 GIT_AUTHOR_NAME=cellar GIT_AUTHOR_EMAIL=cellar@example.invalid
export GIT_COMMITTER_NAME=cellar GIT_COMMITTER_EMAIL=cellar@example.invalid HOME="$WORK"

# --- git: the source repository lives on local disk, built from a fixed seed.
started=$SECONDS
python3 - "$WORK/src" <<'PY'
import os, random, sys
root, rng = sys.argv[1], random.Random(20261129)
for i in range(1200):
    directory = os.path.join(root, f"pkg{i % 12}", f"mod{i % 7}")
    os.makedirs(directory, exist_ok=True)
    if i % 25 == 0:  # binary files, some over the inline threshold and the 4 MiB block size
        size = rng.choice([3_000, 200_000, 5_000_000])
        data = rng.randbytes(size)
        path = os.path.join(directory, f"blob{i}.bin")
    else:
        data = "".join(f"line {n} of file {i}: {rng.random()}\n" for n in range(rng.randrange(1, 60))).encode()
        path = os.path.join(directory, f"file{i}.txt")
    with open(path, "wb") as f:
        f.write(data)
PY
git init -q "$WORK/src"
git -C "$WORK/src" add -A
git -C "$WORK/src" commit -q -m "generated tree"
# A second commit that renames, edits and deletes, so history has more than one tree.
git -C "$WORK/src" mv pkg0 pkg0-renamed
echo "edited" >> "$WORK/src/pkg1/mod1/file1.txt"
git -C "$WORK/src" rm -q -r pkg2
git -C "$WORK/src" commit -q -am "rename, edit, delete"
files=$(git -C "$WORK/src" ls-files | wc -l)
[ "$files" -gt 1000 ] || fail "generated repository has only $files files"

git clone -q --no-local "$WORK/src" "$MNT/repo" || fail "git clone onto the mount failed"
git -C "$MNT/repo" fsck --full --strict 2>&1 || fail "git fsck --full failed on the mount"
status=$(git -C "$MNT/repo" status --porcelain) || fail "git status failed"
[ -z "$status" ] || fail "git status not clean after clone: $(echo "$status" | head)"
diff -r --exclude=.git "$WORK/src" "$MNT/repo" >/dev/null || fail "cloned tree differs from the source"
volume remount "$WORK/v" >/dev/null || fail "remount failed"
status=$(git -C "$MNT/repo" status --porcelain) || fail "git status failed after remount"
[ -z "$status" ] || fail "git status not clean after remount: $(echo "$status" | head)"
git -C "$MNT/repo" fsck --full --strict 2>&1 || fail "git fsck --full failed after remount"
note "git: clone of $files files, fsck and clean status (also after a remount) ok in $((SECONDS - started))s"

# --- Python: a venv on the volume, a package from PyPI into it, then import it.
started=$SECONDS
python=${CELLAR_TEST_PYTHON:-/usr/bin/python3}
"$python" -m venv "$MNT/venv" || fail "python -m venv on the mount failed"
"$MNT/venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir six==1.17.0 ||
  fail "pip install six into the venv on the mount failed"
"$MNT/venv/bin/python" -c 'import six; assert six.PY3' || fail "importing six from the venv failed"
note "python: venv, pip install six, import ok in $((SECONDS - started))s"

# --- SQLite: concurrent writers, each insert its own transaction, busy timeout for the lock.
started=$SECONDS
writers=4 rows=500
# PostgreSQL commits are slower; 200 rows per writer still interleave thousands of commits.
[ "${CELLAR_TEST_META:-sqlite}" = postgres ] && rows=200
for journal in delete wal; do
  db="$MNT/db-$journal.sqlite"
  sqlite3 "$db" "PRAGMA journal_mode=$journal; CREATE TABLE t (writer INTEGER, n INTEGER, payload TEXT, UNIQUE (writer, n));" >/dev/null
  pids=()
  for writer in $(seq "$writers"); do
    python3 - "$db" "$writer" "$rows" <<'PY' &
import sqlite3, sys
db, writer, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = sqlite3.connect(db, timeout=120, isolation_level=None)
for n in range(rows):
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (writer, n, "x" * (n % 300)))
    conn.execute("COMMIT")
conn.close()
PY
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || fail "an SQLite writer ($journal journal) failed"; done
  check=$(sqlite3 "$db" "PRAGMA integrity_check;")
  [ "$check" = ok ] || fail "integrity_check ($journal journal): $check"
  count=$(sqlite3 "$db" "SELECT count(*) FROM t;")
  [ "$count" = $((writers * rows)) ] || fail "$journal journal: $count rows, expected $((writers * rows))"
done
note "sqlite: $writers processes x $rows transactions (rollback journal and WAL), integrity ok in $((SECONDS - started))s"
# Background work must keep up too: a compactor that keeps losing races to the journal's
# writers (PostgreSQL serialization failures) logs errors even when every writer succeeds.
if errors=$(grep " ERROR " "$WORK/v/mount.log"); then
  fail "the mount logged errors during the workloads: $(echo "$errors" | head -3)"
fi
note "ok"
