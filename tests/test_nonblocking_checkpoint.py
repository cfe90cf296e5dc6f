"""Background (non-blocking) checkpoints: `Checkpoint(background=True)` replies once the
cut is taken and records the checkpoint afterwards (issue 10, target 7; docs/deltacr.md,
"Background checkpoints").

The daemon runs with DELTABOX_HOLD=checkpoint.background and DELTABOX_HOLD_UNTIL=<file>
(deltabox/faults.py): while the file is absent, a background checkpoint stays pending
(its cut taken and acknowledged, nothing recorded), however fast recording would be --
so what waits for it, and what does not, is seen without racing it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import deltabox
from conftest import DEMO_TAR, DaemonProcess, delete_tree
from waiting import finished, in_thread

HOLD = "checkpoint.background"


class Held:
    """The hold's release file: `hold()` makes the next background checkpoints pend,
    `release()` lets them be recorded."""

    def __init__(self, path: Path):
        self.path = path

    def hold(self) -> None:
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.path.touch()


def start_held(d: DaemonProcess, release: Path) -> DaemonProcess:
    os.environ["DELTABOX_HOLD"] = HOLD
    os.environ["DELTABOX_HOLD_UNTIL"] = str(release)
    try:
        return d.start()
    finally:
        del os.environ["DELTABOX_HOLD"], os.environ["DELTABOX_HOLD_UNTIL"]


@pytest.fixture(scope="module")
def held_daemon(workdir):
    held = Held(workdir / "nonblocking-release")
    held.release()
    d = start_held(DaemonProcess(workdir / "nonblocking"), held.path)
    with d.client() as c:
        c.import_image("demo", DEMO_TAR)
    yield d, held
    held.release()
    with d.client() as c:
        for s in c.list():
            s.destroy()
    assert d.stop() == 0, d.log()


@pytest.fixture
def env(held_daemon):
    d, held = held_daemon
    held.release()
    with deltabox.Client(d.socket, timeout=60) as c:
        s = c.create("demo")
        s.open_session("python", name="py")
        yield c, s, held
        held.release()
        try:
            delete_tree(c, s)
        except deltabox.NotFound:  # destroyed by the test
            pass


def test_background_checkpoint_is_usable_and_complete(env):
    c, s, _ = env
    s.write_file("/work/f", "v1", make_parents=True)
    s.session("py").run("x = 'v1'")
    cp = s.checkpoint("c1", full=True, background=True)
    assert cp.id and cp.timings_ms.get("frozen_ms", 0) > 0
    done = c.wait_checkpoint(cp)
    assert (done.id, done.pending, done.label, done.parent_id) == (cp.id, False, "c1", "")
    assert c.wait_checkpoint(cp.id).id == cp.id  # a recorded one: at once
    s.write_file("/work/f", "v2")
    s.session("py").run("x = 'v2'")
    assert [k.id for k in s.checkpoints()] == [cp.id]
    s.rollback(cp)
    assert s.read_file("/work/f") == b"v1"
    assert s.session("py").run("print(x)").stdout == b"v1\n"


def test_calls_naming_a_pending_checkpoint_wait_for_it(env):
    """Rollback / WaitCheckpoint / ListCheckpoints / Pin / Diff wait for the record;
    exec and file calls in the sandbox do not, and what they do after the cut is not in
    the checkpoint."""
    c, s, held = env
    s.write_file("/work/f", "v1", make_parents=True)
    s.session("py").run("x = 'v1'")
    held.hold()
    cp = s.checkpoint("c1", full=True, background=True)
    assert cp.pending, "held, the checkpoint must still be pending when the reply leaves"
    # The sandbox is not held up by the recording: the cut captured its files already.
    assert s.exec("echo alive", timeout=20).stdout == b"alive\n"
    s.write_file("/work/f", "v2")
    waits = {
        "rollback": in_thread(lambda: s.rollback(cp.id)),
        "wait": in_thread(lambda: c.wait_checkpoint(cp.id)),
        "list": in_thread(lambda: [k.id for k in s.checkpoints()]),
        "pin": in_thread(lambda: c.pin_checkpoint(cp.id)),
        "diff": in_thread(lambda: c.diff(cp.id, s.id)),
    }
    time.sleep(1.5)
    early = {k: v.get("error", v.get("value")) for k, v in waits.items()
             if not v["thread"].is_alive()}
    assert not early, f"ended while the checkpoint was still pending: {early}"
    held.release()
    assert finished(waits["rollback"]).path in (deltabox.RollbackPath.DOUBLE,
                                                deltabox.RollbackPath.DOUBLE_WAITED,
                                                deltabox.RollbackPath.RESTORE)
    info = finished(waits["wait"])
    assert (info.id, info.pending) == (cp.id, False)
    assert finished(waits["list"]) == [cp.id]
    assert finished(waits["pin"]).pinned
    assert any(e.path == "/work/f" for e in finished(waits["diff"]))
    assert s.read_file("/work/f") == b"v1", "a write after the cut leaked into the checkpoint"
    assert s.session("py").run("print(x)").stdout == b"v1\n"
    c.pin_checkpoint(cp.id, pinned=False)


def test_next_checkpoint_comes_after_the_pending_one(env):
    c, s, held = env
    held.hold()
    first = s.checkpoint("c1", full=True, background=True)
    s.write_file("/work/g", "more", make_parents=True)
    second = in_thread(lambda: s.checkpoint("c2", full=True))
    time.sleep(1.0)
    assert second["thread"].is_alive(), "the next checkpoint did not wait for the pending one"
    held.release()
    c2 = finished(second)
    assert c2.parent_id == first.id
    assert [k.label for k in s.checkpoints()] == ["c1", "c2"]


def test_destroy_waits_for_the_pending_checkpoint(env):
    c, s, held = env
    s.write_file("/work/f", "kept", make_parents=True)
    held.hold()
    cp = s.checkpoint("c1", background=True)
    gone = in_thread(s.destroy)
    time.sleep(1.0)
    assert gone["thread"].is_alive(), "destroy did not wait for the pending checkpoint"
    held.release()
    finished(gone)
    info = c.wait_checkpoint(cp.id)  # recorded whole, its sandbox gone since
    assert not info.pending
    child = c.fork(cp.id, 1)[0].sandbox
    try:
        assert child.read_file("/work/f") == b"kept"
    finally:
        child.destroy()
        c.delete_checkpoint(cp.id)


def test_cli_background_and_wait(env, held_daemon):
    d, _ = held_daemon
    _, s, held = env
    held.hold()
    r = d.cli("snapshot", s.id, "--full", "--background", "-m", "cli")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.decode().strip()
    assert b"pending" in r.stderr
    waiting = in_thread(lambda: d.cli("checkpoint", "wait", cid))
    time.sleep(1.0)
    assert waiting["thread"].is_alive(), "`checkpoint wait` did not wait"
    held.release()
    r = finished(waiting)
    assert r.returncode == 0 and r.stdout.decode().startswith(f"{cid} recorded"), r


def test_background_with_wait_ready_is_refused(env):
    _, s, _ = env
    with pytest.raises(deltabox.InvalidArgument):
        s.checkpoint(full=True, background=True, wait_ready=True)


def test_crash_while_pending_drops_it_cleanly(new_daemon, workdir):
    """kill -9 while a background checkpoint is pending: after the restart it is absent
    (not half there), tmp/ holds nothing of it, the earlier checkpoint still restores."""
    release = workdir / "never-released"
    release.unlink(missing_ok=True)
    d = start_held(new_daemon(), release)
    with deltabox.Client(d.socket, timeout=60) as c:
        c.import_image("demo", DEMO_TAR)
        s = c.create("demo", name="box")
        s.open_session("python", name="py")
        s.write_file("/work/f", "v1", make_parents=True)
        s.session("py").run("x = 'v1'")
        c1 = s.checkpoint("c1", full=True)
        s.write_file("/work/f", "v2")
        s.session("py").run("x = 'v2'")
        c2 = s.checkpoint("c2", full=True, background=True)
        assert c2.pending
        tmp = d.state_dir / "store" / "tmp"
        assert any(tmp.iterdir()), "the pending checkpoint's files are not where expected"
    d.kill()
    d.start()
    with deltabox.Client(d.socket, timeout=60) as c:
        s = c.get("box")
        assert [k.id for k in s.checkpoints()] == [c1.id]
        with pytest.raises(deltabox.NotFound):
            c.wait_checkpoint(c2.id)
        assert sorted(p.name for p in (d.state_dir / "store" / "tmp").iterdir()) == []
        assert not (d.state_dir / "store" / "images" / c2.id).exists()
        assert s.read_file("/work/f") == b"v2"
        s.rollback(c1.id)
        assert s.read_file("/work/f") == b"v1"
        assert s.session("py").run("print(x)").stdout == b"v1\n"
        delete_tree(c, s)
    assert d.stop() == 0, d.log()
