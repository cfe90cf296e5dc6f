"""The event loop never waits for the store's lock (issue 10, target 1).

A worker thread's transaction (a checkpoint's commit, a squash, GC) holds the store's
lock; before, the loop took the same lock for every record it read (GetSandbox, exec,
rollback) and for a hot rollback's switch, so one long transaction stalled every call
of the daemon. Here the daemon runs with DELTABOX_HOLD=checkpoint.commit
(deltabox/faults.py): a checkpoint of sandbox B stops inside its commit transaction,
the store's lock held, until the test releases it. Meanwhile the calls of sandbox A
must be served; A's rollback to a ready standby (its switch is a write: it needs the
lock) is queued for the thread holding it (`Store.switch_soon`), not waited for on the
loop, and completes once released.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import deltabox
from conftest import TINY_TAR, DaemonProcess, stopped_clean
from waiting import finished, in_thread


@pytest.fixture
def held(workdir):
    release, reached = workdir / "store-lock-release", workdir / "store-lock-reached"
    release.touch()  # set-up: commits pass
    env = {"DELTABOX_HOLD": "checkpoint.commit", "DELTABOX_HOLD_UNTIL": str(release),
           "DELTABOX_HOLD_REACHED": str(reached)}
    os.environ.update(env)
    try:
        d = DaemonProcess(workdir / "store-lock").start()
    finally:
        for k in env:
            del os.environ[k]
    yield d, release, reached
    release.touch()
    stopped_clean(d)


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_calls_are_served_while_a_transaction_holds_the_store(held):
    d, release, reached = held
    with deltabox.Client(d.socket, timeout=60) as c:
        c.import_image("tiny", TINY_TAR)
        a, b = c.create("tiny", name="a"), c.create("tiny", name="b")
        a.exec(["sh", "-c", "echo one > /tmp/f"])
        ck = a.checkpoint("one", wait_ready=True)
        assert ck.ready, "the fs checkpoint's standby must be built for a hot rollback"
        a.exec(["sh", "-c", "echo two > /tmp/f"])

        release.unlink()
        reached.unlink(missing_ok=True)
        commit = in_thread(lambda: b.checkpoint("held"))
        wait_for(reached)  # B's commit transaction is open: the store's lock is held

        with deltabox.Client(d.socket, timeout=10) as quick:  # DEADLINE_EXCEEDED if stalled
            assert quick.get(a.id).info.state == "running"
            assert {s.name for s in quick.list()} == {"a", "b"}
        rollback = in_thread(lambda: a.rollback(ck))
        served = in_thread(lambda: a.exec(["cat", "/tmp/f"]).stdout)
        assert finished(served, 10) in (b"one\n", b"two\n"), "an exec waited for the store"
        with deltabox.Client(d.socket, timeout=10) as quick:
            assert quick.get(b.id).info.state == "running"  # the loop still serves
        assert commit["thread"].is_alive(), "the commit must still hold the store's lock"

        release.touch()
        assert finished(commit, 30).label == "held"
        r = finished(rollback, 30)
        assert r.path == "standby"
        assert a.exec(["cat", "/tmp/f"]).stdout == b"one\n"
