"""The build gate's queue (deltabox.core.double_policy.BuildGate): when builds queue for a
slot, the one most likely to be used soon goes first, not the first to ask.

On a busy daemon (docs/deltacr.md, "With 32 busy sandboxes") dozens of builds queue for
the gate's two slots; in first-come order a tree search's used double's replacement waited
behind the standbys of 31 sandboxes that roll back once in a while, and most of its
rollbacks to hot checkpoints took the restore path."""

from __future__ import annotations

import asyncio

from deltabox.core.double_policy import BuildGate, DoublePolicy
from deltabox.core.runtime import StandbySlot
from deltabox.metrics import CallsInFlight


def _run_queue(gate: BuildGate, asks: list[tuple[str, object]]) -> list[str]:
    """One slot held; `asks` (name, priority fn) queue in this order; the slot is
    released: the order in which they get it."""
    order: list[str] = []

    async def build(name: str, priority) -> None:
        async with gate.slot(priority):
            order.append(name)
            await asyncio.sleep(0)

    async def main() -> None:
        async with gate.slot():
            tasks = []
            for name, priority in asks:
                tasks.append(asyncio.ensure_future(build(name, priority)))
                await asyncio.sleep(0)  # queued in this order
            assert gate.waiting == len(asks)
        await asyncio.gather(*tasks)
        assert gate.running == 0 and gate.waiting == 0

    asyncio.run(main())
    return order


def test_a_high_priority_build_overtakes_queued_low_priority_ones():
    gate = BuildGate(1, CallsInFlight())
    order = _run_queue(gate, [("low-1", lambda: 0.1), ("low-2", lambda: 0.1),
                              ("none", None), ("high", lambda: 3.0)])
    assert order == ["high", "low-1", "low-2", "none"]


def test_equal_priorities_keep_their_order_and_priority_is_read_when_a_slot_frees():
    gate = BuildGate(1, CallsInFlight())
    later = {"p": 0.0}
    order = _run_queue(gate, [("a", None), ("b", None), ("rises", lambda: later["p"]),
                              ("c", None)])
    assert order == ["a", "b", "rises", "c"]
    # The same queue, but the third's sandbox starts rolling back while it waits.
    later["p"] = 5.0
    assert _run_queue(BuildGate(1, CallsInFlight()),
                      [("a", None), ("b", None), ("rises", lambda: later["p"]),
                       ("c", None)]) == ["rises", "a", "b", "c"]


def test_a_cancelled_waiter_leaves_the_queue_and_a_granted_one_gives_its_slot_back():
    async def main() -> None:
        gate = BuildGate(1, CallsInFlight())
        got: list[str] = []

        async def build(name: str, priority=None) -> None:
            async with gate.slot(priority):
                got.append(name)

        async with gate.slot():
            queued = asyncio.ensure_future(build("cancelled"))
            await asyncio.sleep(0)
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            assert gate.waiting == 0
            granted = asyncio.ensure_future(build("granted-then-cancelled", lambda: 9.0))
            other = asyncio.ensure_future(build("other"))
            await asyncio.sleep(0)
        # The slot went to the high one; it is cancelled before it runs: the slot
        # passes on instead of leaking.
        granted.cancel()
        await asyncio.gather(granted, other, return_exceptions=True)
        assert got == ["other"] and gate.running == 0 and gate.waiting == 0

    asyncio.run(main())


def test_build_priority_follows_a_sandboxs_rollbacks_in_time():
    policy = DoublePolicy("adaptive")
    tree, rl, idle = StandbySlot(), StandbySlot(), StandbySlot()
    assert policy.build_priority(idle, "c") == 0.0  # never rolled back: last
    t = 1000.0
    for i in range(20):  # a tree search: a rollback to a hot checkpoint every 0.3 s
        policy.habits(tree).rolled_back_at(t + 0.3 * i)
        policy.habits(tree).rolled_back(f"c{i % 8}", True)
    for i in range(4):  # an RL trainer: one every 5 s
        policy.habits(rl).rolled_back_at(t + 5.0 * i)
        policy.habits(rl).rolled_back(f"c{i % 4}", True)
    now = t + 6.0
    tree_rate = policy.habits(tree).rollbacks_per_s(now)
    rl_rate = policy.habits(rl).rollbacks_per_s(now)
    assert 1.0 < tree_rate <= 1 / 0.3 + 1e-9
    assert 0.05 < rl_rate < 0.2 < tree_rate
    # A sandbox that stops rolling back decays: one minute later it is not ahead.
    assert policy.habits(tree).rollbacks_per_s(t + 66.0) < 1 / 59
    # A build a call waits for goes first whatever its sandbox does.
    policy.urgent.add("waited-for")
    assert policy.build_priority(idle, "waited-for") == float("inf")


def test_a_sandbox_rolling_back_often_yields_less_for_its_builds():
    """A build waits for a quiet moment at most half the interval between its sandbox's
    rollbacks (each missing double is a restore in a rollback after all); one of a sandbox
    that never rolled back waits the full MAX_YIELD_S."""
    policy = DoublePolicy("adaptive")
    often, never = StandbySlot(), StandbySlot()
    for i in range(20):
        policy.rolled_back(often, f"c{i % 8}", True, True)
    assert policy.max_yield_s(never, "c") == BuildGate.MAX_YIELD_S
    assert policy.max_yield_s(often, "c0") < 0.1
