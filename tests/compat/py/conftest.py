"""Fixtures for the compatibility tests with the official `daytona` Python client.

Every client call goes through `Recorder.call` (or `Recorder.expect_error`) so that run.sh can print
a matrix of client calls, not only of test cases. Results go to $COMPAT_RESULTS as JSON lines.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from daytona import Daytona, DaytonaError

REQUIRED_ENV = ("DAYTONA_API_URL", "DAYTONA_API_KEY", "COMPAT_RESULTS", "COMPAT_CANARY", "COMPAT_DATA_DIR")


def _results_dir() -> Path:
    return Path(os.environ["COMPAT_RESULTS"])


def _append(file_name: str, record: dict) -> None:
    with open(_results_dir() / file_name, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def pytest_configure(config):
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        raise pytest.UsageError(f"run these tests through tests/compat/run.sh; unset: {', '.join(missing)}")


def case_id(item) -> str:
    # test_c_two_sandboxes_share_a_volume -> "c"
    return item.name.split("_")[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # One record per test: the failing phase if any, else the call phase.
    if report.when == "call" or (report.when != "call" and report.failed):
        message = ""
        if report.failed:
            message = (
                str(report.longrepr.reprcrash.message)
                if hasattr(report.longrepr, "reprcrash")
                else str(report.longrepr)
            )
        _append(
            "py-cases.jsonl",
            {"case": case_id(item), "test": item.name, "ok": report.passed, "phase": report.when, "error": message},
        )


class Recorder:
    """Runs client calls and records each one (call name, ok, error) for the matrix."""

    def __init__(self, case: str):
        self.case = case

    def _record(self, name: str, ok: bool, error: str = "") -> None:
        _append("py-calls.jsonl", {"case": self.case, "call": name, "ok": ok, "error": error[:500]})

    def call(self, name: str, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            self._record(name, False, f"{type(exc).__name__}: {exc}")
            raise
        self._record(name, True)
        return result

    def expect_error(self, name: str, error_class: type, status: int, fn, *args, **kwargs) -> DaytonaError:
        """The call must raise `error_class` with HTTP `status`; returns the error."""
        try:
            result = fn(*args, **kwargs)
        except error_class as exc:
            if getattr(exc, "status_code", None) != status:
                self._record(name, False, f"status_code {exc.status_code}, expected {status}: {exc}")
                raise AssertionError(f"{name}: status_code {exc.status_code}, expected {status}: {exc}") from exc
            self._record(name, True)
            return exc
        except Exception as exc:
            self._record(name, False, f"{type(exc).__name__} instead of {error_class.__name__}: {exc}")
            raise AssertionError(
                f"{name}: raised {type(exc).__name__} instead of {error_class.__name__}: {exc}"
            ) from exc
        returned = f"{type(result).__name__} {getattr(result, 'id', result)}"
        self._record(name, False, f"no error; returned {returned}")
        unexpected = AssertionError(f"{name}: expected {error_class.__name__} ({status}), got success: {returned}")
        unexpected.result = result  # so the caller can clean up what was created after all
        raise unexpected


def wait_until_volume_gone(daytona, rec, name: str, bound: float = 60.0) -> list[str]:
    """After volume.delete: get(name) answers the volume in pending_delete/deleting, then 404.
    Returns the states seen on the way."""
    seen = []
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            state = daytona.volume.get(name).state
        except DaytonaError as exc:
            if exc.status_code == 404:
                rec._record("volume.get (deleted) -> 404", True)
                return seen
            rec._record("volume.get (deleted) -> 404", False, f"{type(exc).__name__}: {exc}")
            raise
        if not seen or seen[-1] != state:
            seen.append(state)
        if state not in ("pending_delete", "deleting", "deleted"):
            rec._record("volume.get (deleted) -> 404", False, f"state {state} after volume.delete")
            raise AssertionError(f"volume {name} is {state} after volume.delete (states seen: {seen})")
        time.sleep(0.2)
    rec._record("volume.get (deleted) -> 404", False, f"still there after {bound} s, states {seen}")
    raise AssertionError(f"volume {name} still answers {bound} s after volume.delete (states seen: {seen})")


class Cleanup:
    """Deletes what a test created even when the test fails, sandboxes first, then volumes."""

    def __init__(self, daytona: Daytona):
        self.daytona = daytona
        self.sandboxes = []
        self.volumes = []

    def run(self) -> None:
        for sandbox in self.sandboxes:
            try:
                sandbox.delete(wait=True)
            except Exception:
                pass  # already deleted by the test
        for volume in self.volumes:
            for _ in range(20):
                try:
                    self.daytona.volume.delete(volume)
                    break
                except DaytonaError as exc:
                    if exc.status_code != 409:
                        break
                    time.sleep(0.5)


@pytest.fixture(scope="session")
def daytona() -> Daytona:
    return Daytona()


@pytest.fixture
def rec(request) -> Recorder:
    return Recorder(case_id(request.node))


@pytest.fixture
def cleanup(daytona):
    registry = Cleanup(daytona)
    yield registry
    registry.run()


@pytest.fixture
def unique():
    """unique("data") -> "py-data-1a2b3c4d": volume names that never collide between runs or tests."""
    return lambda stem: f"py-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def canary() -> str:
    return os.environ["COMPAT_CANARY"]


@pytest.fixture(scope="session")
def server_data_dir() -> str:
    return os.environ["COMPAT_DATA_DIR"]
