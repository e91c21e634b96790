"""Totals of the fuzz runs from their HAR reports: requests, endpoints reached (method and path
template of the OpenAPI document), answers by status class, and every 5xx.

    python3 totals.py OPENAPI_URL LABEL... -- RUN.har...   (one label per HAR file, in order)

Exits 1 if any answer was a 5xx."""

import json
import re
import sys
import urllib.request
from collections import Counter
from urllib.parse import urlsplit

split = sys.argv.index("--")
openapi_url, labels, hars = sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :]
with urllib.request.urlopen(openapi_url, timeout=30) as response:
    document = json.load(response)
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
OPERATIONS = {
    (method.upper(), path) for path, item in document["paths"].items() for method in item if method in METHODS
}
TEMPLATES = [
    (re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"), path)
    for path in document["paths"]
]


def template(url):
    path = urlsplit(url).path
    for pattern, name in TEMPLATES:
        if pattern.match(path):
            return name
    return "(no operation: " + path + ")"


reached_all = set()
total = Counter()
server_errors = []
print(f"{'run':42} {'requests':>9} {'endpoints':>9} {'2xx':>7} {'4xx':>7} {'5xx':>5}")
for label, har in zip(labels, hars, strict=True):
    with open(har) as file:
        entries = json.load(file)["log"]["entries"]
    reached = set()
    classes = Counter()
    for entry in entries:
        method, url = entry["request"]["method"], entry["request"]["url"]
        status = entry["response"]["status"]
        operation = (method, template(url))
        if operation in OPERATIONS:
            reached.add(operation)
        classes[f"{status // 100}xx"] += 1
        if status >= 500:
            server_errors.append(f"{label}: {status} {method} {url}")
    reached_all |= reached
    total.update(classes)
    total["requests"] += len(entries)
    print(
        f"{label:42} {len(entries):>9} {len(reached):>9} {classes['2xx']:>7} {classes['4xx']:>7} {classes['5xx']:>5}"
    )
print(
    f"{'total':42} {total['requests']:>9} {len(reached_all):>9} {total['2xx']:>7} {total['4xx']:>7} {total['5xx']:>5}"
    f"   ({len(OPERATIONS)} operations in the document)"
)
for line in server_errors:
    print("5xx:", line)
sys.exit(1 if server_errors else 0)
