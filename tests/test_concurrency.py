"""Concurrent full checkpoints of many sandboxes run side by side in the daemon.

Each full checkpoint holds one of the daemon's blocking threads for its whole frozen dump
(mostly waiting on CRIU). With asyncio's default executor -- min(32, cpus + 4) threads --
more concurrent checkpoints than that queued behind each other while the host's cores
idled (issue 10: 64 sandboxes on 16 cores, p50 830 ms at a load of 3-6).
`deltabox.server.app.blocking_threads` sizes the executor for that work.

Watched from outside, as a user would: the sandboxes' inits, sampled while all of them
checkpoint at once. A sandbox is being dumped while its cgroup is frozen or CRIU holds its
init (ptrace-seized: CRIU thaws the cgroup once it has seized the tree); both happen inside
the daemon thread that runs the checkpoint, so the most sandboxes being dumped at one
instant is bounded by the threads that can dump at once.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from conftest import freezer_state

from deltabox.config import Config
from deltabox.server.app import blocking_threads

# asyncio's default executor size (ThreadPoolExecutor's max_workers default).
ASYNCIO_DEFAULT_THREADS = min(32, (os.cpu_count() or 1) + 4)


def _dumping(pid: int) -> bool:
    """Whether the sandbox whose init is `pid` is being dumped: frozen, or seized."""
    if freezer_state(pid) == "FROZEN":
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return any(line.split()[1:] not in ([], ["0"]) for line in status.splitlines()
               if line.startswith("TracerPid:"))


def _checkpoint_all(sandboxes) -> tuple[int, list]:
    """Full-checkpoint every sandbox at once (one client thread each); the most of
    them seen being dumped at one instant, and each call's result (or exception)."""
    inits = [s.info.init_pid for s in sandboxes]
    results: list = [None] * len(sandboxes)
    go = threading.Barrier(len(sandboxes) + 1)
    done = threading.Event()

    def one(i: int) -> None:
        go.wait()
        try:
            results[i] = sandboxes[i].checkpoint(full=True)
        except Exception as e:  # reported by the assertion below, with the others
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sandboxes))]
    for t in threads:
        t.start()
    seen: dict[int, list[float]] = {}  # init -> [first, last] instant seen being dumped

    def watch() -> None:
        while not done.is_set():
            for pid in inits:
                if _dumping(pid):
                    now = time.monotonic()
                    seen.setdefault(pid, [now, now])[1] = now
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    go.wait()
    for t in threads:
        t.join(timeout=300)
    done.set()
    watcher.join()
    return _most_at_once(seen.values()), results


def _most_at_once(intervals) -> int:
    """The most of the [first, last] intervals that overlap. Each sandbox is dumped once
    per round and each interval lies within its dump, so this never counts more dumps
    at once than there were (a sweep over the inits is not one instant: counting each
    sweep's hits could)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                    key=lambda e: (e[0], -e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_blocking_threads_default_is_sized_for_many_checkpoints():
    assert blocking_threads(Config()) >= 64
    assert blocking_threads(Config(blocking_threads=3)) == 3


def test_concurrent_full_checkpoints_dump_side_by_side(client):
    # More sandboxes than asyncio's default executor has threads, so that a daemon
    # running its dumps there could never have them all frozen at once.
    n = 2 * ASYNCIO_DEFAULT_THREADS + 8
    assert blocking_threads(Config()) >= n
    sandboxes = []
    try:
        for _ in range(n):
            sandboxes.append(client.create("tiny"))
        for s in sandboxes:  # a change each: no checkpoint is `unchanged` (no dump)
            assert s.exec(["sh", "-c", "echo x > /tmp/x"]).exit_code == 0
        best = 0
        for _ in range(5):  # a loaded 2-core VM may stagger a round; take the best
            most, results = _checkpoint_all(sandboxes)
            failed = [r for r in results if not hasattr(r, "timings_ms")]
            assert not failed, failed
            assert all(r.timings_ms.get("dump_ms", 0) > 0 for r in results), results
            best = max(best, most)
            if best > ASYNCIO_DEFAULT_THREADS:
                break
            for s in sandboxes:
                s.exec(["sh", "-c", "echo y >> /tmp/x"])
        assert best > ASYNCIO_DEFAULT_THREADS, (
            f"at most {best} of {n} sandboxes were being dumped at once: the daemon "
            f"runs its dumps no wider than asyncio's {ASYNCIO_DEFAULT_THREADS}-thread "
            "default executor")
    finally:
        for s in sandboxes:
            s.destroy()
