"""Waiting on a condition instead of sleeping a fixed time.

A fixed sleep is either too short on a loaded machine (a flaky test) or too long
everywhere (a slow suite); the tests poll the condition they need instead.
"""

from __future__ import annotations

import threading
import time


def wait_for(fn, what: str, timeout: float = 10.0, interval: float = 0.05):
    """Call `fn` until it returns something truthy, and return that; after `timeout`
    seconds, fail naming `what` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def poll(fn, timeout: float = 10.0, interval: float = 0.05):
    """Call `fn` until it returns something truthy or `timeout` seconds pass; return its
    last value (for callers that assert on it themselves, with their own message)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def stays(fn, what: str, duration: float, interval: float = 0.05) -> None:
    """Check that `fn` stays truthy for `duration` seconds (a thing that must not
    happen, watched for a while); fail naming `what` the moment it is false."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert fn(), f"{what} stopped holding"
        time.sleep(interval)


def in_thread(fn) -> dict:
    """Run fn in a thread; the dict gets 'value' or 'error' when it ends."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def finished(out: dict, timeout: float = 60.0) -> object:
    """What `in_thread`'s fn returned (or raise what it raised), once it ended."""
    out["thread"].join(timeout)
    assert not out["thread"].is_alive(), f"the call did not end in {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["value"]
