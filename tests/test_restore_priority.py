"""After a rollback the sandbox runs at full speed (issues 10/11, docs/deltacr.md "After a
restore: running at full speed").

A body double is built in the background: CRIU restores it at nice BACKGROUND_NICE, but
nice orders tasks only within one cgroup, and CRIU runs in the double's own cgroup -- a
sibling of every running sandbox's. So the double's cgroup weighs like a task at that nice
value while it is built and parked, and gets the default weight (a sandbox's) when it takes
over; the restored tasks keep the nice value and scheduling policy they were dumped with.
"""

from __future__ import annotations

from deltabox.host.cgroups import (BACKGROUND_NICE, CGROUP_ROOT, NICE_TO_WEIGHT, PARENT,
                                   detect_driver)
from test_deltacr import double_settled, rollback
from waiting import wait_for



def cpu_nice(cgroups, branch_id: str) -> int:
    """The nice value the cgroup's CPU weight is that of (v2 cpu.weight.nice, v1 cpu.shares)."""
    if cgroups.version == 2:
        return int((CGROUP_ROOT / PARENT / cgroups.instance / branch_id / "cpu.weight.nice")
                   .read_text())
    shares = int((CGROUP_ROOT / "cpu" / PARENT / cgroups.instance / branch_id / "cpu.shares")
                 .read_text())
    return NICE_TO_WEIGHT.index(shares) - 20


SCHED = "import os; print(os.getpid(), os.getpriority(os.PRIO_PROCESS, 0), " \
        "os.sched_getscheduler(0))"


def test_a_double_is_built_at_background_weight_and_wakes_at_the_default(daemon, demo):
    cgroups = detect_driver(daemon.instance)
    py = demo.open_session("python", name="py")
    before = py.run(SCHED).stdout.decode().split()
    live = demo.info.branch_id
    assert cpu_nice(cgroups, live) == 0
    others = cgroups.names()
    ckpt = demo.checkpoint("w", full=True, wait_ready=True)
    assert ckpt.ready, "the checkpoint's body double was not built"
    built = wait_for(lambda: cgroups.names() - others, "the double's cgroup")
    assert [cpu_nice(cgroups, b) for b in built] == [BACKGROUND_NICE] * len(built)

    rollback(demo, ckpt, "double", daemon.state_dir)
    now = demo.info.branch_id
    assert now in built, (now, built)
    # (given back once the rollback's reply has left: DeltaCR.wake)
    wait_for(lambda: cpu_nice(cgroups, now) == 0, "the woken double's cgroup to get the "
             "default CPU weight back (else the sandbox runs at a tenth of its share)",
             timeout=5)
    # The restored session: the same process, at the nice value and policy it had.
    assert py.run(SCHED).stdout.decode().split() == before
    double_settled(daemon.state_dir)  # the doubles built after the rollback, before destroy


def test_children_forked_from_a_warm_pool_run_at_the_default_weight(daemon, client, demo):
    cgroups = detect_driver(daemon.instance)
    demo.open_session("python", name="py").run("x = 1")
    ckpt = demo.checkpoint("warm-me", full=True, wait_ready=True)
    others = cgroups.names()
    assert client.warm(ckpt, 1, wait=True) == 1
    pool = cgroups.names() - others
    assert [cpu_nice(cgroups, b) for b in pool] == [BACKGROUND_NICE] * len(pool)
    children = client.fork(ckpt, 1)
    try:
        assert [c.error for c in children] == [None]
        child = children[0].sandbox
        assert child.info.branch_id in pool, "the child was not the warm incarnation"
        assert cpu_nice(cgroups, child.info.branch_id) == 0
        assert child.session("py").run("print(x)").stdout == b"1\n"
    finally:
        for c in children:
            if c.sandbox is not None:
                c.sandbox.destroy()
        double_settled(daemon.state_dir)
