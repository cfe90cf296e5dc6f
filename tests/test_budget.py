"""The memory budget for body doubles and warm pools (--warm-budget).

Whether a double exists is read from the processes (a frozen deltabox-init in the
store's cgroups), not from the daemon's reports; `wait_ready` makes each checkpoint
return only once the daemon has decided (built its double, or skipped it).
"""

from __future__ import annotations

from conftest import DEMO_TAR, TINY_TAR, freezer_state, sandbox_inits
from observing import doubles, live_init
from waiting import wait_for


def test_over_budget_no_double_and_rollback_restores(new_daemon):
    d = new_daemon(extra_args=("--warm-budget", "1M")).start()
    with d.client() as c:
        c.import_image("demo", DEMO_TAR)
        sbx = c.create("demo")
        py = sbx.open_session("python", name="py")
        py.run("import os; blob = os.urandom(20 << 20); x = 1")  # 20 MB: over 1 MB
        ck1 = sbx.checkpoint("one", full=True, wait_ready=True)
        # A double would hold about what the sandbox holds (> 20 MB): over budget.
        assert doubles(d.state_dir) == set()
        py.run("x = 2")
        ck2 = sbx.checkpoint("two", full=True, wait_ready=True)
        assert doubles(d.state_dir) == set()
        assert not ck2.ready
        py.run("x = 3")
        inits = set(sandbox_inits(d.state_dir))
        r = sbx.rollback(ck2)
        assert r.path == "restore", r.path
        init = live_init(d.state_dir, sbx)
        assert init not in inits and freezer_state(init) == "THAWED"  # a restore, started now
        assert py.run("print(x)").stdout == b"2\n"
        assert c.warm(ck1, 2, wait=True) == 0  # pools obey the same budget
        assert doubles(d.state_dir) == set(), "a warm double was built over the budget"
        sbx.destroy()


def test_within_budget_rollback_uses_the_double(new_daemon):
    d = new_daemon(extra_args=("--warm-budget", "2G", "--hottest-pool", "1")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        sh.run("X=1")
        ck = sbx.checkpoint(full=True, wait_ready=True)
        assert ck.ready
        (double,) = doubles(d.state_dir)  # one frozen incarnation, built before the reply
        sh.run("X=2")
        r = sbx.rollback(ck)
        assert r.path == "double", r.path
        assert live_init(d.state_dir, sbx) == double, "the rollback did not wake the double"
        assert freezer_state(double) == "THAWED"
        assert sh.run("echo $X").stdout == b"1\n"
        sbx.destroy()


# ---- warm pools: least recently used first, pinned ones kept --------------------------------

HOLD = ("import os, time\nblob = os.urandom(24 << 20)\nopen('/held', 'w').write('yes')\n"
        "while True: time.sleep(1)\n")


def _warm_pools(state_dir) -> dict[str, int]:
    """Which checkpoint each frozen incarnation (a warm double) holds: its /tag file,
    read through the process's own root -- the processes, not the daemon's word."""
    out: dict[str, int] = {}
    for pid in doubles(state_dir):
        try:
            tag = open(f"/proc/{pid}/root/tag").read()
        except OSError:
            continue
        out[tag] = out.get(tag, 0) + 1
    return out


def test_warm_pools_evicted_least_recently_used_first_pinned_kept(new_daemon):
    """A budget with room for two doubles (each holds a 24 MiB process): warming a third
    checkpoint evicts the least recently used pool -- unless it is pinned -- and the
    third is warmed in its place."""
    d = new_daemon(extra_args=("--warm-budget", "72M", "--no-standby")).start()
    with d.client() as c:
        c.import_image("demo", DEMO_TAR)
        sbx = c.create("demo")
        sbx.exec(["python3", "-c", HOLD], detach=True)
        wait_for(lambda: sbx.exec(["cat", "/held"]).stdout == b"yes", "24 MiB held")
        ckpts = {}
        for tag in "ABCD":
            sbx.write_file("/tag", tag)
            ckpts[tag] = sbx.checkpoint(tag, full=True)
        sbx.destroy()
        assert c.warm(ckpts["A"], 1, wait=True) == 1
        assert c.warm(ckpts["B"], 1, wait=True) == 1
        assert _warm_pools(d.state_dir) == {"A": 1, "B": 1}
        # A used again (a warm call, as a fork would): B is now the least recently used
        assert c.warm(ckpts["A"], 1, wait=True) == 1
        assert c.warm(ckpts["C"], 1, wait=True) == 1, "no room was made for C"
        assert _warm_pools(d.state_dir) == {"A": 1, "C": 1}, "B (least recent) was not evicted"
        # a pinned pool is kept although it is the least recently used
        c.pin_checkpoint(ckpts["A"])
        assert c.warm(ckpts["D"], 1, wait=True) == 1
        assert _warm_pools(d.state_dir) == {"A": 1, "D": 1}, "the pinned A was evicted"
        # an evicted checkpoint stays restorable: a fork of B starts cold
        (child,) = c.fork(ckpts["B"], 1)
        assert child.error is None and child.sandbox.read_file("/tag") == b"B"
        child.sandbox.destroy()
        c.pin_checkpoint(ckpts["A"], pinned=False)
