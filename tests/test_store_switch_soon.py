"""A hot rollback's switch jumps the store lock's queue (issue 10, target 1).

When a worker's transaction holds the store's lock, the event loop must not wait for it;
it used to hand the switch to a thread of the shared pool, which then queued for the lock
behind the other workers (checkpoint commits of 32 busy sandboxes): 115 ms p50 where the
switch itself is 0.3 ms. `Store.switch_soon` queues it instead: the thread holding the
lock runs it as it lets the lock go, before any thread waiting for it.
"""

from __future__ import annotations

import threading
import time

from deltabox.store.metadata import Store


def test_switch_runs_at_the_holders_release_before_waiting_threads(tmp_path):
    (tmp_path / "store").mkdir()
    store = Store(tmp_path / "store")
    order: list[str] = []
    holding, let_go = threading.Event(), threading.Event()

    def holder():
        with store.transaction() as db:
            db.execute("SELECT 1")
            holding.set()
            let_go.wait(10)
        order.append("holder released")

    waiters_started = []

    def waiter(i):
        waiters_started.append(i)
        with store.transaction() as db:  # blocks: the holder has the lock
            db.execute("SELECT 1")
            order.append(f"waiter {i}")

    h = threading.Thread(target=holder)
    h.start()
    assert holding.wait(10)
    ws = [threading.Thread(target=waiter, args=(i,)) for i in range(4)]
    for w in ws:
        w.start()
    while len(waiters_started) < 4:
        time.sleep(0.001)
    time.sleep(0.05)  # the waiters are blocked on the lock

    caller = threading.get_ident()

    def switch():
        order.append("switch")
        assert threading.get_ident() != caller
        with store.transaction() as db:  # re-enters the lock its runner holds
            db.execute("SELECT 1")
        return "switched"

    t0 = time.perf_counter()
    fut = store.switch_soon(switch)
    assert time.perf_counter() - t0 < 0.05, "switch_soon waited for the lock"
    assert not fut.done(), "the lock is held: it cannot have run yet"
    let_go.set()
    assert fut.result(10) == "switched"
    h.join(10)
    for w in ws:
        w.join(10)
    waited = [x for x in order if x != "holder released"]
    assert waited[0] == "switch", order  # before every thread that waited for the lock
    assert sorted(waited[1:]) == [f"waiter {i}" for i in range(4)]
    store.close()


def test_switch_runs_at_once_when_the_lock_is_free_and_errors_reach_the_caller(tmp_path):
    (tmp_path / "store").mkdir()
    store = Store(tmp_path / "store")
    fut = store.switch_soon(lambda: threading.get_ident())
    assert fut.done() and fut.result() == threading.get_ident()

    def fails():
        raise ValueError("nope")
    fut = store.switch_soon(fails)
    assert isinstance(fut.exception(1), ValueError)
    # the lock is free again and usable
    with store.transaction() as db:
        db.execute("SELECT 1")
    assert not store._lock._is_owned()
    store.close()


def test_a_switch_queued_while_the_holder_lets_go_is_not_lost(tmp_path):
    """Many switches queued from one thread while others take the lock in a loop: each
    one runs (none stays queued with the lock free)."""
    (tmp_path / "store").mkdir()
    store = Store(tmp_path / "store")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            with store.transaction() as db:
                db.execute("SELECT 1")
            store._query("SELECT 1")

    threads = [threading.Thread(target=churn) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        futs = [store.switch_soon(lambda i=i: i) for i in range(2000)]
        assert [f.result(10) for f in futs] == list(range(2000))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    store.close()
