"""Memory per double: with `ksm = on`, a sandbox and its body doubles are marked for KSM
and ksmd merges their identical pages; with `ksm = off` nothing of theirs is merged even
while ksmd runs (deltabox.host.ksm, docs/deltacr.md "Memory per double").

The processes are read from the kernel (/proc/<pid>/ksm_stat): `ksm_merge_any` is the
PR_SET_MEMORY_MERGE mark, `ksm_merging_pages` the pages of that process that ksmd has
merged. Each test restores the host's ksmd settings (run, pages_to_scan) afterwards.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from deltabox.config import init_binary
from deltabox.host import ksm
from deltabox.host.cgroups import detect_driver
from conftest import DEMO_TAR
from waiting import wait_for

pytestmark = pytest.mark.skipif(not ksm.HAS_KSM, reason="no KSM / PR_SET_MEMORY_MERGE here")

# Two equal copies of 8 MiB of random bytes: merge candidates within one process, and
# between a sandbox and its double (same checkpoint).
PY_STATE = "import os\nblob = os.urandom(8 << 20)\ntwin = bytes(bytearray(blob))"
DAEMON_ARGS = ("--double-policy", "always", "--hot-checkpoints", "1", "--hottest-pool", "1")


@pytest.fixture
def ksm_host():
    """The host's ksmd as it was, after the test (the daemon's `ksm = on` changes it)."""
    before = ksm.read_state()
    yield
    (ksm.KSM_DIR / "pages_to_scan").write_text(str(before.pages_to_scan))
    (ksm.KSM_DIR / "run").write_text(str(before.run))


def _sandbox_with_double(daemon):
    """A demo sandbox whose Python holds PY_STATE, and a full checkpoint of it whose body
    double is ready: (client, sandbox, live pids, the double's pids)."""
    c = daemon.client()
    c.import_image("demo", DEMO_TAR)
    sbx = c.create("demo", name="merge")
    r = sbx.open_session("python", name="py").run(PY_STATE)
    assert r.exit_code == 0, r.stderr
    cgroups = detect_driver(daemon.instance)
    live = cgroups.pids(next(n for n in cgroups.names()
                             if c.get(sbx.id).info.init_pid in cgroups.pids(n)))
    ck = sbx.checkpoint("c", full=True, wait_ready=True)
    assert ck.ready, "the checkpoint's body double was not built"
    doubles = wait_for(lambda: [p for n in cgroups.names() for p in cgroups.pids(n)
                                if p not in live], "the double's processes")
    return c, sbx, live, doubles


def _merging(pids) -> int:
    return sum(int(ksm.process_stat(p).get("ksm_merging_pages", 0)) for p in pids)


def test_double_pages_merge_with_ksm_on(new_daemon, ksm_host):
    d = new_daemon(extra_args=("--ksm", "on", *DAEMON_ARGS)).start()
    state = ksm.read_state()
    assert state.run == 1, "ksm = on did not start ksmd"
    c, sbx, live, doubles = _sandbox_with_double(d)
    try:
        # The init marks the live tree; the criu that forked the double carried the mark.
        for pid in live + doubles:
            assert ksm.process_stat(pid).get("ksm_merge_any") is True, pid
        wait_for(lambda: _merging(doubles) >= 2048, "ksmd merging the double's pages "
                 "(>= 8 MiB of them)", timeout=40, interval=0.25)
        assert _merging(live) > 0
    finally:
        sbx.destroy()
        c.close()


def test_nothing_merges_with_ksm_off(new_daemon, ksm_host):
    d = new_daemon(extra_args=("--ksm", "off", *DAEMON_ARGS)).start()
    c, sbx, live, doubles = _sandbox_with_double(d)
    # ksmd runs, and merges a marked process on the host holding the same kind of state
    # (started through the init's --exec-memory-merged, as the daemon starts criu).
    (ksm.KSM_DIR / "pages_to_scan").write_text("1000")
    (ksm.KSM_DIR / "run").write_text("1")
    control = subprocess.Popen(
        [str(init_binary()), "--exec-memory-merged", sys.executable, "-c",
         PY_STATE + "\nimport sys\nsys.stdout.write('ready\\n'); sys.stdout.flush()"
         "\nsys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert control.stdout.readline() == b"ready\n"
        assert ksm.process_stat(control.pid).get("ksm_merge_any") is True
        wait_for(lambda: _merging([control.pid]) >= 1024, "ksmd merging the marked control "
                 "process", timeout=40, interval=0.25)
        for pid in live + doubles:
            st = ksm.process_stat(pid)
            assert st.get("ksm_merge_any") is False and st.get("ksm_merging_pages") == 0, \
                (pid, st)
    finally:
        control.kill()
        control.wait()
        sbx.destroy()
        c.close()


def test_auto_follows_the_host(ksm_host):
    """`ksm = auto` marks sandboxes only where ksmd already runs, and changes nothing."""
    (ksm.KSM_DIR / "run").write_text("0")
    assert ksm.decide("auto", 1000) is False
    assert ksm.decide("off", 1000) is False
    (ksm.KSM_DIR / "run").write_text("1")
    assert ksm.decide("auto", 1000) is True
    assert ksm.read_state().run == 1
