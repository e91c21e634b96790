"""Measurements with the official Python client (printed, never asserted):

1. time from volume.get(name, create=True) to a started sandbox with the volume mounted, median of N;
2. how many sandboxes run at once on one volume: steps of 5, 10, 20, ... 640 (cumulative), each sandbox
   writes its own file and one sandbox reads them all; stops at the first failure or when a step
   exceeds its time bound, and prints what broke first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from daytona import CreateSandboxFromSnapshotParams, Daytona, VolumeMount

MOUNT = "/home/daytona/volume"


def create_with(daytona: Daytona, volume, timeout: float = 120):
    params = CreateSandboxFromSnapshotParams(
        language="python", volumes=[VolumeMount(volume_id=volume.id, mount_path=MOUNT)]
    )
    return daytona.create(params, timeout=timeout)


def time_to_started_sandbox(daytona: Daytona, runs: int) -> None:
    seconds = []
    for i in range(runs):
        name = f"measure-{uuid.uuid4().hex[:8]}"
        start = time.monotonic()
        volume = daytona.volume.get(name, create=True)
        sandbox = create_with(daytona, volume)
        seconds.append(time.monotonic() - start)
        check = sandbox.process.exec(f"touch {MOUNT}/probe && ls {MOUNT}")
        mounted = check.exit_code == 0 and "probe" in check.result
        print(f"  run {i + 1:2}: {seconds[-1]:.3f} s{'' if mounted else '  (volume NOT usable: ' + check.result + ')'}")
        sandbox.delete()
        daytona.volume.delete(volume)
    print(
        f"volume.get(create=True) -> started sandbox with the volume mounted: median {statistics.median(seconds):.3f} s"
        f" over {runs} (min {min(seconds):.3f}, max {max(seconds):.3f})"
    )


def concurrency(daytona: Daytona, steps: list[int], step_bound: float, workers: int) -> None:
    volume = daytona.volume.get(f"measure-many-{uuid.uuid4().hex[:8]}", create=True)
    running = []
    broke = None
    try:
        for target in steps:
            start = time.monotonic()
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(create_with, daytona, volume) for _ in range(target - len(running))]
                errors = []
                for future in futures:
                    try:
                        running.append(future.result())
                    except Exception as exc:  # what broke is the measurement's result
                        errors.append(f"{type(exc).__name__}: {exc}")
            created_in = time.monotonic() - start
            if errors:
                broke = f"creating sandbox {len(running) + 1} of {target}: {errors[0]} ({len(errors)} failed)"
                break
            # Every sandbox writes its own file; the first one must then see all of them.
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(lambda sb: sb.process.exec(f"echo {sb.id} > {MOUNT}/{sb.id}.txt"), running))
            bad = [r for r in results if r.exit_code != 0]
            if bad:
                broke = f"writing with {target} sandboxes: {bad[0].result[:300]}"
                break
            listing = running[0].process.exec(f"ls {MOUNT} | grep -c '.txt$'")
            seen = int(listing.result.strip() or 0) if listing.exit_code == 0 else -1
            elapsed = time.monotonic() - start
            print(
                f"  {target:3} sandboxes at once: created in {created_in:.1f} s, all wrote,"
                f" one sees {seen} files ({elapsed:.1f} s)"
            )
            if seen != target:
                broke = f"with {target} sandboxes one sandbox saw {seen} of {target} files"
                break
            if elapsed > step_bound:
                broke = f"step {target} took {elapsed:.0f} s, over the {step_bound:.0f} s bound; not pushing further"
                break
        print(
            f"ran {len(running)} sandboxes at once on one volume; "
            + (f"first break: {broke}" if broke else "nothing broke up to the last step")
        )
    finally:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda sb: _quietly(sb.delete, 60, True), running))
        for _ in range(60):
            if _quietly(daytona.volume.delete, volume):
                break
            time.sleep(1)


def _quietly(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", default="5,10,20,40,80,160,320,640")
    parser.add_argument("--step-bound", type=float, default=180.0, help="seconds one step may take")
    parser.add_argument("--workers", type=int, default=8, help="client threads creating sandboxes")
    args = parser.parse_args()
    daytona = Daytona()
    status = 0
    print("\nMeasurement 1: time to a started sandbox with a fresh volume")
    try:
        time_to_started_sandbox(daytona, args.runs)
    except Exception as exc:  # a measurement reports what failed and goes on
        print(f"  aborted: {type(exc).__name__}: {exc}")
        status = 1
    print("\nMeasurement 2: sandboxes at once on one volume")
    concurrency(daytona, [int(s) for s in args.steps.split(",")], args.step_bound, args.workers)
    return status


if __name__ == "__main__":
    sys.exit(main())
