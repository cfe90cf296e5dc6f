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


def _stop_criu(daemon, start, tries: int = 20) -> tuple[int, dict | None]:
    """SIGSTOP a `criu swrk` of the daemon: a CRIU that hangs (as it does in the kernel at
    times), never finishing on its own before its timeout. Each try runs `start(i)` (a
    call in a thread, or None once it has returned) and looks for 2 s or until that call
    is over -- a dump is over in tens of ms, and may slip through. The criu's pid and the
    call it hangs."""
    import psutil
    daemon_proc = psutil.Process(daemon.proc.pid)
    for i in range(tries):
        call = start(i)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not (call and not call["thread"].is_alive()):
            for p in daemon_proc.children(recursive=True):
                try:
                    if p.name() == "criu" and "swrk" in p.cmdline():  # not `criu check`
                        p.send_signal(signal.SIGSTOP)
                        return p.pid, call
                except psutil.NoSuchProcess:
                    pass
        if call is not None:
            finished(call, timeout=120)
    raise AssertionError(f"no CRIU caught in {tries} tries")


# A CRIU that hangs in each of the places one runs for a sandbox; `start(i)` makes it run.
HUNG = {
    # a body double's build (a restore in the background, after the checkpoint returns)
    "double": lambda sbx, old: lambda i: sbx.checkpoint(
        f"c{i}", full=True, rollback_likely=True) and None,
    # a full checkpoint's dump (the sandbox frozen, its lifecycle lock held)
    "dump": lambda sbx, old: lambda i: sbx.exec(["sh", "-c", f"echo {i} > /root/v"]).check() \
        and in_thread(lambda: sbx.checkpoint(f"c{i}", full=True, rollback_likely=False)),
    # a rollback's restore (no double: the restore path, the lifecycle lock held)
    "rollback": lambda sbx, old: lambda i: in_thread(lambda: sbx.rollback(old)),
}


@pytest.mark.parametrize("teardown", ["destroy", "shutdown"])
@pytest.mark.parametrize("hung", sorted(HUNG))
def test_a_hung_criu_does_not_hold_up_teardown(new_daemon, hung, teardown):
    """A CRIU that hangs (SIGSTOPped here) -- building a body double, dumping a full
    checkpoint, restoring for a rollback -- is aborted by a destroy or the daemon's
    shutdown, not waited for until CRIU's timeout (120 s): both end within seconds and
    leave nothing behind; the call that waited for it fails clearly; the checkpoint is
    not judged unrestorable for it (an abort is not CRIU's failure)."""
    d = new_daemon().start()
    instance = store_instance(d.state_dir)
    with deltabox.Client(d.socket, timeout=60) as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sbx.exec(["sleep", "1000"], detach=True)
        old = sbx.checkpoint("old", full=True, rollback_likely=False)
        criu_pid, call = _stop_criu(d, HUNG[hung](sbx, old))
        t0 = time.monotonic()
        if teardown == "destroy":
            try:
                sbx.destroy()
            except deltabox.DeadlineExceeded:
                raise AssertionError(f"the destroy hung; the daemon's log:\n{d.log()}")
            took = time.monotonic() - t0
            assert poll(lambda: not _cgroups(instance), 15), sorted(_cgroups(instance))
        else:
            assert d.stop(timeout=60) == 0, d.log()
            took = time.monotonic() - t0
        if call is not None:  # cut off by the server (CANCELLED) if the shutdown came first
            assert _outcome(call) in CLEAR | {"CANCELLED"}, hung
    assert took < 30, f"the {teardown} waited {took:.1f} s for a hung CRIU ({hung})"
    assert not psutil_alive(criu_pid)
    if teardown == "shutdown":
        assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}
        assert not _cgroups(instance)
    assert not _events(d, "shutdown.stray_cgroup", "shutdown.stray_mount",
                       "rpc.internal_error", "checkpoint.unusable")


def test_an_aborted_restore_leaves_no_zombie(new_daemon, workdir):
    """A rollback's CRIU restore that a destroy aborts after CRIU made the tree (held at
    "pre-resume", deltabox/faults.py): the tree's root is the daemon's child (CRIU's
    rst_sibling) and no pid is returned for it, yet it is reaped -- no zombie left in
    the daemon."""
    import psutil
    release, reached = workdir / "restore-release", workdir / "restore-reached"
    env = {"DELTABOX_HOLD": "restore.pre-resume", "DELTABOX_HOLD_UNTIL": str(release),
           "DELTABOX_HOLD_REACHED": str(reached)}
    os.environ.update(env)
    try:
        d = new_daemon().start()
    finally:
        for k in env:
            del os.environ[k]
    with deltabox.Client(d.socket, timeout=120) as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sbx.exec(["sleep", "1000"], detach=True)
        old = sbx.checkpoint("old", full=True, rollback_likely=False)  # no double: no restore
        rollback = in_thread(lambda: sbx.rollback(old))
        wait_for(reached.exists, "the rollback's restore at pre-resume")
        destroy = in_thread(sbx.destroy)
        time.sleep(0.5)  # the destroy aborts the restore: its tree and criu killed
        release.touch()
        finished(destroy, timeout=60)
        assert _outcome(rollback) in CLEAR
    daemon = psutil.Process(d.pid)

    def zombies():
        return [p.pid for p in daemon.children() if p.status() == psutil.STATUS_ZOMBIE]
    assert poll(lambda: not zombies(), 5), zombies()


def psutil_alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
