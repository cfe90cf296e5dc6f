"""The memory budget for body doubles and warm pools (--warm-budget)."""

from __future__ import annotations

import time

from conftest import DEMO_TAR


def test_over_budget_no_double_and_rollback_restores(new_daemon):
    d = new_daemon(extra_args=("--warm-budget", "1M")).start()
    with d.client() as c:
        c.import_image("demo", DEMO_TAR)
        sbx = c.create("demo")
        py = sbx.open_session("python", name="py")
        py.run("import os; blob = os.urandom(20 << 20); x = 1")  # 20 MB: over 1 MB
        ck1 = sbx.checkpoint("one", full=True)
        time.sleep(1.0)
        # A double would hold about what the sandbox holds (> 20 MB): over budget.
        py.run("x = 2")
        ck2 = sbx.checkpoint("two", full=True)
        time.sleep(1.5)
        py.run("x = 3")
        r = sbx.rollback(ck2)
        assert r.path == "restore", r.path
        assert py.run("print(x)").stdout == b"2\n"
        assert c.warm(ck1, 2, wait=True) == 0  # pools obey the same budget
        sbx.destroy()


def test_within_budget_rollback_uses_the_double(new_daemon):
    d = new_daemon(extra_args=("--warm-budget", "2G")).start()
    with d.client() as c:
        c.import_image("tiny", "/var/cache/deltabox/images/tiny.tar")
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        sh.run("X=1")
        ck = sbx.checkpoint(full=True, wait_ready=True)
        assert ck.ready
        sh.run("X=2")
        r = sbx.rollback(ck)
        assert r.path == "double", r.path
        assert sh.run("echo $X").stdout == b"1\n"
        sbx.destroy()
