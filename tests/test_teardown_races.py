"""Teardown racing everything else: a destroy, or the daemon's shutdown, while another
call on the same sandbox is in flight (exec, checkpoint fs / full / background, rollback
by restore or by double, fork, warm, a body double being built).

Each call either succeeds or fails with a clear status (NOT_FOUND, ABORTED,
FAILED_PRECONDITION, UNAVAILABLE; never UNKNOWN or INTERNAL), the daemon stays up (or
exits 0 when stopped), and afterwards the host holds nothing of the sandbox: no
process, cgroup or mount (and, once stopped, no loop device). The moments vary: the
destroy (or SIGTERM) comes at once, and a little later, while the call is underway.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import deltabox
from conftest import TINY_TAR, DaemonProcess, leftovers, store_instance
from deltabox.client.results import ForkResult
from test_teardown import _cgroups, _events, _mounts, _nothing_left
from waiting import finished, in_thread
from waiting import poll, wait_for

CLEAR = {"NOT_FOUND", "ABORTED", "FAILED_PRECONDITION", "UNAVAILABLE"}
DELAYS = (0.0, 0.08)  # seconds between starting the call and the teardown


def _outcome(out: dict) -> str:
    """'ok', or the status code of the error the call ended with (any other exception
    is re-raised: the test shows it)."""
    try:
        finished(out, timeout=120)
    except deltabox.DeltaboxError as e:
        return e.code
    return "ok"


def _setup(c):
    """A sandbox with a process; `old`: a full checkpoint without a double (a rollback
    to it restores), `hot`: the head, with its double ready (a rollback takes it)."""
    sbx = c.create("tiny")
    sbx.exec(["sleep", "1000"], detach=True)
    old = sbx.checkpoint("old", full=True, rollback_likely=False)
    sbx.exec(["sh", "-c", "echo 2 > /root/v"]).check()
    hot = sbx.checkpoint("hot", full=True, rollback_likely=True, wait_ready=True)
    return sbx, old, hot


# What is in flight when the teardown comes, each a call on the sandbox (or its tree).
CALLS = {
    "exec": lambda c, s, old, hot: s.exec(["sh", "-c", "sleep 0.2; echo hi"]),
    "checkpoint-fs": lambda c, s, old, hot: s.checkpoint("x"),
    "checkpoint-full": lambda c, s, old, hot: s.checkpoint("x", full=True,
                                                           rollback_likely=False),
    "checkpoint-background": lambda c, s, old, hot: c.wait_checkpoint(
        s.checkpoint("x", full=True, background=True, rollback_likely=False)),
    # the call returns at the cut; the double is being built (a CRIU restore) meanwhile
    "double-build": lambda c, s, old, hot: (
        s.exec(["sh", "-c", "echo 3 > /root/v"]).check(),
        s.checkpoint("x", full=True, rollback_likely=True)),
    "rollback-restore": lambda c, s, old, hot: s.rollback(old),
    "rollback-double": lambda c, s, old, hot: s.rollback(hot),
    "fork": lambda c, s, old, hot: c.fork(old, 2),
    "warm": lambda c, s, old, hot: c.warm(old.id, 2, wait=True),
}


def _forget(c, sbx, result, *ckpts) -> None:
    """Destroy a fork's children and delete the sandbox's checkpoints (their warm
    pools and doubles go with them)."""
    if isinstance(result, ForkResult):
        for child in result:
            if child.sandbox is not None:
                child.sandbox.destroy()
    for ckpt in ckpts:
        try:
            c.delete_checkpoint(ckpt.id, cascade=True)
        except deltabox.NotFound:
            pass


@pytest.fixture(scope="module")
def racer(workdir):
    d = DaemonProcess(workdir / "teardown-races").start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
    try:
        yield d
        assert d.stop() == 0, d.log()
        assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}
    finally:  # a failed test leaves neither the daemon nor what it leaked
        d.cleanup()
    # Whatever a destroy left behind, the shutdown would have had to sweep (and log).
    assert not _events(d, "shutdown.stray_cgroup", "shutdown.stray_mount",
                       "rpc.internal_error")


@pytest.mark.parametrize("call", list(CALLS))
def test_destroy_racing(racer, call):
    """Destroy while `call` runs, at two moments: both end cleanly and nothing of the
    sandbox is left (before the fix, a destroy that waited behind a rollback killed
    the branch it had read before waiting -- the old one, which the rollback was
    retiring at the same time -- and left the new incarnation running, unowned)."""
    d = racer
    instance = store_instance(d.state_dir)
    mounts_before = _mounts(d.state_dir)
    with deltabox.Client(d.socket, timeout=120) as c:
        for delay in DELAYS:
            before = _cgroups(instance)
            sbx, old, hot = _setup(c)
            out = in_thread(lambda: CALLS[call](c, sbx, old, hot))
            time.sleep(delay)
            destroyed = in_thread(sbx.destroy)
            got, gone = _outcome(out), _outcome(destroyed)
            assert got in CLEAR | {"ok"}, (call, delay, got, _events(d, "rpc.internal_error"))
            assert gone == "ok", (call, delay, gone)
            with pytest.raises(deltabox.NotFound):
                c.get(sbx.id)
            _forget(c, sbx, out.get("value"), old)
            assert poll(lambda: not (_cgroups(instance) - before), 15), \
                (call, delay, sorted(_cgroups(instance) - before))
    # nothing of those sandboxes runs or is mounted; the daemon still serves
    assert poll(lambda: not _nothing_left(d, mounts_before), 15), \
        _nothing_left(d, mounts_before)
    with d.client() as c:
        assert c.list() == []
    assert d.proc.poll() is None, d.log()


def test_destroys_of_a_stopped_sandbox_go_one_at_a_time(racer):
    """A sandbox whose init died is stopped (no runtime, so no lifecycle lock before the
    fix): several destroys at once tear it down once -- one succeeds, the others find
    it gone (NOT_FOUND), none fails half way (INTERNAL), nothing is left."""
    d = racer
    instance = store_instance(d.state_dir)
    with deltabox.Client(d.socket, timeout=60) as c:
        for _ in range(3):
            before = _cgroups(instance)
            sbx = c.create("tiny")
            sbx.exec(["sleep", "1000"], detach=True)
            os.kill(sbx.info.init_pid, signal.SIGKILL)
            wait_for(lambda: c.get(sbx.id).info.state == deltabox.SandboxState.STOPPED,
                     "the sandbox to be stopped")
            calls = [in_thread(sbx.destroy) for _ in range(4)]
            codes = sorted(_outcome(o) for o in calls)
            assert codes == ["NOT_FOUND"] * 3 + ["ok"], codes
            assert poll(lambda: not (_cgroups(instance) - before), 15), \
                sorted(_cgroups(instance) - before)
    assert d.proc.poll() is None, d.log()


SHUTDOWN_CALLS = ("exec", "checkpoint-full", "checkpoint-background", "double-build",
                  "rollback-restore", "fork", "warm")


@pytest.mark.parametrize("call", SHUTDOWN_CALLS)
def test_shutdown_racing(new_daemon, call):
    """SIGTERM while `call` runs: the call ends cleanly (or is cut off as the daemon
    goes: UNAVAILABLE), the daemon exits 0, and nothing is left -- no mount, loop
    device, process or cgroup, and nothing the shutdown had to sweep as a stray."""
    d = new_daemon().start()
    instance = store_instance(d.state_dir)
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
    c = deltabox.Client(d.socket, timeout=120)
    try:
        sbx, old, hot = _setup(c)
        out = in_thread(lambda: CALLS[call](c, sbx, old, hot))
        time.sleep(0.05)
        assert d.stop(timeout=120) == 0, d.log()
        got = _outcome(out)
        assert got in CLEAR | {"ok", "CANCELLED"}, (call, got)
    finally:
        c.close()
    assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}
    assert not _cgroups(instance)
    assert not _events(d, "shutdown.stray_cgroup", "shutdown.stray_mount", "rpc.internal_error")


def _stop_a_restore(daemon, sbx, tries: int = 20) -> int:
    """Take full checkpoints (each starts a body double's build: a CRIU restore) until
    one restore is caught and SIGSTOPped: a CRIU that hangs (as it does in the kernel
    at times), never finishing on its own before its timeout. Its pid."""
    import psutil
    daemon_proc = psutil.Process(daemon.proc.pid)
    for i in range(tries):
        sbx.checkpoint(f"c{i}", full=True, rollback_likely=True)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # the dump's criu ended with the call
            for p in daemon_proc.children(recursive=True):
                try:
                    if p.name() == "criu":
                        p.send_signal(signal.SIGSTOP)
                        return p.pid
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.001)
    raise AssertionError(f"no double's CRIU restore caught in {tries} checkpoints")


@pytest.mark.parametrize("teardown", ["destroy", "shutdown"])
def test_a_hung_restore_does_not_hold_up_teardown(new_daemon, teardown):
    """A body double's CRIU restore that hangs (SIGSTOPped here) is aborted by a destroy
    or the daemon's shutdown -- killed with its branch -- not waited for until CRIU's
    timeout (120 s): both end within seconds and leave nothing behind; the checkpoint
    is not judged unrestorable for it (an abort is not CRIU's failure)."""
    d = new_daemon().start()
    instance = store_instance(d.state_dir)
    with deltabox.Client(d.socket, timeout=120) as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sbx.exec(["sleep", "1000"], detach=True)
        criu_pid = _stop_a_restore(d, sbx)
        t0 = time.monotonic()
        if teardown == "destroy":
            sbx.destroy()
            took = time.monotonic() - t0
            assert poll(lambda: not _cgroups(instance), 15), sorted(_cgroups(instance))
        else:
            assert d.stop(timeout=60) == 0, d.log()
            took = time.monotonic() - t0
    assert took < 30, f"the {teardown} waited {took:.1f} s for a hung CRIU restore"
    assert not psutil_alive(criu_pid)
    if teardown == "shutdown":
        assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}
        assert not _cgroups(instance)
    assert not _events(d, "shutdown.stray_cgroup", "shutdown.stray_mount",
                       "rpc.internal_error", "checkpoint.unusable")


def psutil_alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
