"""Prints the compatibility matrix from the JSON-lines results of both suites.

Usage: python matrix.py RESULTS_DIR [py] [ts]   (the suites that ran; default both)
Exit status 1 when any case failed or a suite that ran left no results.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

CASES = OrderedDict(
    [
        ("a", "docs TypeScript example, verbatim"),
        ("b", "docs Python example, VolumeMount(volume_id=, mount_path=)"),
        ("c", "two sandboxes share one volume"),
        ("d", "one sandbox mounts two volumes"),
        ("e", "the volume outlives its sandbox"),
        ("f", "delete a volume in use -> conflict error"),
        ("g", "mount-path rules -> bad-request error"),
        ("h", "read-only mount; subpath cannot be escaped"),
        ("i", "no store/DB credentials in the sandbox"),
        ("j", "sandbox fs calls: info/find/search/replace/mode/move/delete"),
        ("k", "a large file streamed in and out (upload_file/download_file)"),
    ]
)
ONLY_IN = {"a": "ts", "b": "py"}

# The same client call spelled by each client.
CALL_ALIASES = {
    "process.exec": "process exec",
    "process.executeCommand": "process exec",
    "fs.upload_file": "fs upload file",
    "fs.uploadFile": "fs upload file",
    "fs.download_file": "fs download file",
    "fs.downloadFile": "fs download file",
    "fs.create_folder": "fs create folder",
    "fs.createFolder": "fs create folder",
    "fs.list_files": "fs list files",
    "fs.listFiles": "fs list files",
    "fs.get_file_info": "fs get file info",
    "fs.getFileDetails": "fs get file info",
    "fs.find_files": "fs find files",
    "fs.findFiles": "fs find files",
    "fs.search_files": "fs search files",
    "fs.searchFiles": "fs search files",
    "fs.replace_in_files": "fs replace in files",
    "fs.replaceInFiles": "fs replace in files",
    "fs.set_file_permissions": "fs set file permissions",
    "fs.setFilePermissions": "fs set file permissions",
    "fs.move_files": "fs move files",
    "fs.moveFiles": "fs move files",
    "fs.upload_file_stream": "fs upload file stream",
    "fs.uploadFileStream": "fs upload file stream",
    "fs.download_file_stream": "fs download file stream",
    "fs.downloadFileStream": "fs download file stream",
    "fs.delete_file": "fs delete file",
    "fs.deleteFile": "fs delete file",
    "volume.get(create=True)": "volume.get(name, create)",
    "volume.get(create=true)": "volume.get(name, create)",
    "delete(sandbox)": "delete(sandbox)",
    "daytona.delete(sandbox)": "delete(sandbox)",
    "sandbox.delete(wait=True)": "sandbox.delete(wait)",
    "sandbox.delete(wait)": "sandbox.delete(wait)",
}


def row_name(call: str) -> str:
    """The call's row: its alias, with any " (detail)" kept, e.g. "fs.deleteFile (missing) -> 404"."""
    base, space, detail = call.partition(" (")
    if call in CALL_ALIASES or base not in CALL_ALIASES:
        return CALL_ALIASES.get(call, call)
    return f"{CALL_ALIASES[base]}{space}{detail}"


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell(records: list[dict]) -> str:
    if not records:
        return "-"
    failures = sum(1 for r in records if not r["ok"])
    return "pass" if failures == 0 else f"FAIL {failures}/{len(records)}"


def main() -> int:
    results = Path(sys.argv[1])
    suites = sys.argv[2:] or ["py", "ts"]
    cases = {lang: load(results / f"{lang}-cases.jsonl") for lang in ("py", "ts")}
    calls = {lang: load(results / f"{lang}-calls.jsonl") for lang in ("py", "ts")}
    failed = False

    print("\nCompatibility matrix: cases (issue 3, point 6)")
    print(f"  {'case':<64} {'Python':<10} {'TypeScript':<10}")
    for letter, title in CASES.items():
        cells = []
        for lang in ("py", "ts"):
            if ONLY_IN.get(letter, lang) != lang:
                cells.append("n/a")
                continue
            if lang not in suites:
                cells.append("skipped")
                continue
            value = cell([r for r in cases[lang] if r["case"] == letter])
            failed |= value != "pass"
            cells.append(value if value != "-" else "NOT RUN")
        print(f"  {letter}. {title:<61} {cells[0]:<10} {cells[1]:<10}")

    print("\nCompatibility matrix: client calls")
    print(f"  {'call':<64} {'Python':<10} {'TypeScript':<10}")
    rows: OrderedDict[str, dict[str, list[dict]]] = OrderedDict()
    for lang in ("py", "ts"):
        for record in calls[lang]:
            row = row_name(record["call"])
            rows.setdefault(row, {"py": [], "ts": []})[lang].append(record)
    for row in sorted(rows, key=lambda name: (name.startswith("create -> 400"), name)):
        print(f"  {row:<64} {cell(rows[row]['py']):<10} {cell(rows[row]['ts']):<10}")

    failures = [(lang, r) for lang in ("py", "ts") for r in cases[lang] if not r["ok"]]
    if failures:
        print("\nFailures (first line of each):")
        for lang, record in failures:
            first = (record.get("error") or "").strip().splitlines()
            print(f"  [{lang}] {record['case']} {record['test']}: {first[0][:300] if first else ''}")
    for lang in suites:
        if not cases[lang]:
            print(f"\nno {lang} results in {results}: that suite did not run")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
