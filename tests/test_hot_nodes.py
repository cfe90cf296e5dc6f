"""Hot nodes: body doubles for more than the head (docs/deltacr.md, "The double lifecycle").

Each sandbox keeps a frozen double of each of its last K checkpoints (K = --hot-checkpoints,
default 4), and a pool of two for the checkpoint it just rolled back to, within the one
memory budget. Everything is checked on the processes, not on the daemon's word: a double
is a frozen deltabox-init of the store's cgroups, and which checkpoint it is a double of
is told by its process tree -- each checkpoint here has one more `sleep` in it, with its
own duration as a marker.

When a double is built at all (docs/deltacr.md, "When a double is built") is checked the
same way: a `rollback_likely` hint, the adaptive policy's learning window, and builds
held back while a client call is in flight.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from conftest import DEMO_TAR, TINY_TAR, freezer_state, sandbox_inits
from observing import children_named, doubles, live_init
from waiting import stays, wait_for


def _markers(init: int) -> frozenset[str]:
    """The `sleep N` marker durations running below an init (its checkpoint's)."""
    found = set()
    try:
        for p in psutil.Process(init).children(recursive=True):
            try:
                argv = p.cmdline()
            except (psutil.Error, OSError):   # gone meanwhile
                continue
            if len(argv) == 2 and argv[0].endswith("sleep"):
                found.add(argv[1])
    except psutil.Error:
        pass
    return frozenset(found)


def doubles_of(state_dir: Path) -> dict[frozenset[str], list[int]]:
    """Frozen inits (body doubles) by the markers of the checkpoint they were made of."""
    out: dict[frozenset[str], list[int]] = {}
    for pid in doubles(state_dir):
        out.setdefault(_markers(pid), []).append(pid)
    return out


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _memory_current(pid: int) -> int:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if ctrls == "" or "memory" in ctrls.split(","):
            base = Path("/sys/fs/cgroup") if ctrls == "" else Path("/sys/fs/cgroup/memory")
            for name in ("memory.current", "memory.usage_in_bytes"):
                if (base / path.lstrip("/") / name).exists():
                    return int((base / path.lstrip("/") / name).read_text())
    return 0


def _checkpoints_with_markers(sbx, sh, n: int, first: int = 1, **kw) -> list:
    """n full checkpoints; the i-th holds `sleep 100i` .. (all earlier ones too)."""
    ckpts = []
    for i in range(first, first + n):
        # ... once it runs sleep (a dump between fork and exec would hold a copy of sh)
        sh.run(f"sleep 100{i} & X={i}; "
               f"until [ \"$(tr '\\0' ' ' < /proc/$!/cmdline)\" = 'sleep 100{i} ' ]; do :; done")
        ckpts.append(sbx.checkpoint(f"c{i}", full=True, wait_ready=True, **kw))
    return ckpts


def _no_criu(d) -> bool:
    return not children_named(d.pid, "criu")


def _marks(i: int) -> frozenset[str]:
    return frozenset(f"100{k}" for k in range(1, i + 1))


def test_last_checkpoints_keep_their_doubles_and_the_older_one_is_used(new_daemon):
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        ck1, ck2 = _checkpoints_with_markers(sbx, sh, 2)
        by = wait_for(lambda: (lambda b: b if _marks(1) in b and _marks(2) in b else None)(
            doubles_of(d.state_dir)), "a frozen double of each of the two checkpoints")
        assert [ck.ready for ck in sbx.checkpoints()] == [True, True]
        (older,) = by[_marks(1)]
        sh.run("X=changed")
        r = sbx.rollback(ck1)  # not the head: it used to take the restore path
        assert r.path == "double", r
        init = live_init(d.state_dir, sbx)
        assert init == older, "the rollback did not wake the older checkpoint's double"
        assert freezer_state(init) == "THAWED"
        assert _nice(init) == 0, "the double was built at low priority and kept it"
        assert sh.run("echo $X").stdout == b"1\n"
        # The head's double was not thrown away by the rollback to another node.
        assert len(doubles_of(d.state_dir).get(_marks(2), [])) == 1
        sbx.destroy()


def test_back_to_back_rollbacks_both_take_a_double(new_daemon):
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        (ck,) = _checkpoints_with_markers(sbx, sh, 1)
        sh.run("X=changed")
        assert sbx.rollback(ck).path == "double"
        # It was used: it gets a pool of two (the used one replaced, one more).
        pool = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(
            doubles_of(d.state_dir).get(_marks(1), [])), "two doubles of the checkpoint", timeout=30)
        woken = []
        for _ in range(2):
            r = sbx.rollback(ck)  # no pause between them
            assert r.path == "double", r
            woken.append(live_init(d.state_dir, sbx))
        assert sorted(woken) == sorted(pool), (woken, pool)
        assert sh.run("echo $X").stdout == b"1\n"
        # ... and the pool is filled again.
        wait_for(lambda: len(doubles_of(d.state_dir).get(_marks(1), [])) == 2,
                 "the pool to be filled again", timeout=30)
        sbx.destroy()


def test_only_the_last_k_checkpoints_keep_doubles(new_daemon):
    # (always: the adaptive policy would stop building them, no rollback being seen)
    d = new_daemon(extra_args=("--hot-checkpoints", "2", "--double-policy", "always")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        ckpts = _checkpoints_with_markers(sbx, sh, 3)
        assert len({ck.id for ck in ckpts}) == 3, ckpts
        seen = []
        try:
            wait_for(lambda: seen.append(set(doubles_of(d.state_dir))) or
                     seen[-1] == {_marks(2), _marks(3)},
                     "doubles of the last two checkpoints only", timeout=30)
        except AssertionError:
            raise AssertionError(f"doubles by marker: {seen[-1]}") from None
        assert [ck.ready for ck in sbx.checkpoints()] == [False, True, True]
        before = set(sandbox_inits(d.state_dir))
        r = sbx.rollback(ckpts[0])  # cold now: a restore, started by the call
        assert r.path == "restore", r
        assert live_init(d.state_dir, sbx) not in before
        # It is the hottest now; the least recently used (c2) gave its double up.
        wait_for(lambda: set(doubles_of(d.state_dir)) == {_marks(1), _marks(3)},
                 "doubles of c1 and c3", timeout=30)
        sbx.destroy()


def test_right_after_a_checkpoint_the_first_ready_wins(new_daemon):
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        sh.run("sleep 1001 & X=1; "
               "until [ \"$(tr '\\0' ' ' < /proc/$!/cmdline)\" = 'sleep 1001 ' ]; do :; done")
        ck = sbx.checkpoint("c1", full=True)  # its double is still being built
        frozen = doubles(d.state_dir)
        r = sbx.rollback(ck)
        init = live_init(d.state_dir, sbx)
        if r.path == "restore":  # the restore was ready first
            assert "wait_ms" not in r.timings_ms and init not in frozen
        else:
            assert r.path == "double-waited" and r.timings_ms["wait_ms"] > 0, r
        assert freezer_state(init) == "THAWED" and sh.run("echo $X").stdout == b"1\n"
        # The loser is not left behind: at most the pool of the checkpoint afterwards.
        wait_for(lambda: _no_criu(d), "no criu running")
        by = doubles_of(d.state_dir)
        assert set(by) <= {_marks(1)} and len(by.get(_marks(1), [])) <= 2, by
        sbx.destroy()


def test_doubles_stay_within_the_budget_least_recently_used_go(new_daemon):
    d = new_daemon(extra_args=("--warm-budget", "96M", "--double-policy", "always")).start()
    with d.client() as c:
        c.import_image("demo", DEMO_TAR)
        sbx = c.create("demo")
        sh = sbx.open_session("bash", name="sh")
        py = sbx.open_session("python", name="py")
        py.run("import os; blob = os.urandom(24 << 20)")  # a double holds > 24 MB
        _checkpoints_with_markers(sbx, sh, 4)
        wait_for(lambda: _marks(4) in doubles_of(d.state_dir), "the head's double")
        held = [_memory_current(p) for p in doubles(d.state_dir)]
        assert sum(held) <= 96 << 20, f"doubles hold {sum(held) >> 20} MiB over 96 MiB"
        assert 1 <= len(held) < 4, held  # some evicted, the least recently used first
        by = doubles_of(d.state_dir)
        assert _marks(1) not in by, "the oldest checkpoint kept its double, newer ones not"
        assert sbx.checkpoints()[-1].ready
        sbx.destroy()


# ---- when a double is built (docs/deltacr.md, "When a double is built") ------------------

def test_rollback_likely_false_builds_no_double_and_true_does(new_daemon):
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        (ck1,) = _checkpoints_with_markers(sbx, sh, 1, rollback_likely=False)
        wait_for(lambda: _no_criu(d), "no criu running")
        assert doubles(d.state_dir) == set(), "a double was restored although the call " \
            "said no rollback was likely"
        assert not ck1.ready
        (ck2,) = _checkpoints_with_markers(sbx, sh, 1, first=2, rollback_likely=True)
        assert ck2.ready
        by = doubles_of(d.state_dir)
        assert set(by) == {_marks(2)} and len(by[_marks(2)]) == 1, by
        before = set(sandbox_inits(d.state_dir))
        sh.run("X=changed")
        r = sbx.rollback(ck1)
        assert r.path == "restore", r
        assert live_init(d.state_dir, sbx) not in before, "no restore ran: an old process woke"
        assert sh.run("echo $X").stdout == b"1\n"
        sbx.destroy()


def test_adaptive_policy_stops_doubles_when_a_sandbox_never_rolls_back(new_daemon):
    d = new_daemon().start()  # double-policy = adaptive, the default
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        ckpts = _checkpoints_with_markers(sbx, sh, 6)
        wait_for(lambda: _no_criu(d), "no criu running")
        by = doubles_of(d.state_dir)
        # The learning window: the first checkpoints get doubles (1 rollback per checkpoint
        # assumed), then the learnt rate (0.49 after two steps without one) stops them.
        assert _marks(1) in by and _marks(2) in by, by
        assert not {_marks(i) for i in range(3, 7)} & set(by), by
        assert [ck.ready for ck in ckpts] == [True, True, False, False, False, False]
        before = set(sandbox_inits(d.state_dir))
        sh.run("X=changed")
        r = sbx.rollback(ckpts[-1])
        assert r.path == "restore", r  # reported truthfully: no double existed
        assert live_init(d.state_dir, sbx) not in before
        assert sh.run("echo $X").stdout == b"6\n"
        sbx.destroy()


def test_double_builds_wait_for_calls_in_flight(new_daemon):
    """A double build does not start while another sandbox's exec is being served."""
    d = new_daemon(extra_args=("--double-policy", "always")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        a, b = c.create("tiny"), c.create("tiny")
        a.exec(["true"])
        b.exec(["true"])
        long_exec = threading.Thread(target=lambda: b.exec(["sleep", "3"]))
        long_exec.start()
        try:
            wait_for(lambda: any(_argv(p)[:1] == ["sleep"] for p in psutil.Process(
                d.pid).children(recursive=True)), "b's exec running")
            t0 = time.monotonic()
            ck = a.checkpoint("a", full=True)
            # The gate holds the build back while b's exec is in flight (at most 1 s).
            left = 0.8 - (time.monotonic() - t0)
            if left > 0:
                stays(lambda: _no_criu(d) and not doubles(d.state_dir),
                      "no double build while a call is in flight", left, interval=0.02)
        finally:
            long_exec.join()
        wait_for(lambda: a.checkpoints()[-1].ready, "a's double once the exec ended")
        assert ck.id == a.checkpoints()[-1].id
        a.destroy()
        b.destroy()


def _argv(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.Error, OSError):   # gone meanwhile
        return []


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_rollback_tail_after_the_reply_still_happens(new_daemon):
    """A rollback's tail runs once its reply has left (deltabox.core.after_reply): the old
    tree is still killed and its branch unmounted, the next double is built, the log line
    is written -- and rollbacks one after another keep taking the double."""
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sh = sbx.open_session("sh", name="sh")
        (ck,) = _checkpoints_with_markers(sbx, sh, 1)
        for i in range(3):
            old_init, old_branch = live_init(d.state_dir, sbx), sbx.refresh().info.branch_id
            sh.run(f"X=changed{i}")
            assert sbx.rollback(ck).path == "double"
            assert live_init(d.state_dir, sbx) != old_init
            wait_for(lambda: _gone(old_init), "the old tree's init to be killed")
            wait_for(lambda: old_branch not in Path("/proc/self/mounts").read_text(),
                     "the old branch to be unmounted")
            assert sh.run("echo $X").stdout == b"1\n"
            wait_for(lambda: doubles_of(d.state_dir).get(_marks(1)),
                     "the next double of the checkpoint", timeout=30)
        wait_for(lambda: d.log().count("sandbox.rolled_back") == 3, "three log lines")
        sbx.destroy()
