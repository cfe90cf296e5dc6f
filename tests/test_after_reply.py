"""deltabox.core.after_reply: work a call defers until its reply has left.

The rollback hot path relies on it (tests/test_hot_nodes.py checks that its tail still
happens, tests/test_crash.py that a crash right after the reply keeps the rollback);
here the ordering rules themselves, on a bare event loop.
"""

from __future__ import annotations

import asyncio

from deltabox.core.after_reply import Reply, after_reply


def test_outside_a_call_it_runs_at_the_next_turn():
    async def main():
        done = []
        after_reply(done.append, 1)
        assert done == []
        await asyncio.sleep(0)
        return done
    assert asyncio.run(main()) == [1]


def test_inside_a_call_it_waits_for_the_reply_in_order_and_spawned_tasks_share_it():
    async def main():
        done = []
        reply = Reply()

        async def call():
            reply.open()
            after_reply(done.append, "a")
            await asyncio.ensure_future(spawned())  # a task the call spawned
            return "reply"

        async def spawned():
            after_reply(done.append, "b")

        assert await asyncio.ensure_future(call()) == "reply"
        await asyncio.sleep(0.01)
        assert done == [], "ran before the reply left"
        reply.sent()
        assert done == ["a", "b"]
        after_reply_late = reply.add  # a task of a call answered already
        after_reply_late(done.append, "c")
        await asyncio.sleep(0)
        return done
    assert asyncio.run(main()) == ["a", "b", "c"]


def test_a_failing_step_does_not_stop_the_others():
    async def main():
        done = []
        reply = Reply()
        reply.add(lambda: 1 / 0)
        reply.add(done.append, "after")
        reply.sent()
        return done
    assert asyncio.run(main()) == ["after"]


def test_what_waits_runs_even_if_the_call_never_reports_its_end():
    async def main():
        done = []
        reply = Reply()
        reply.SAFETY_S = 0.05
        reply.add(done.append, "x")
        await asyncio.sleep(0.2)
        return done
    assert asyncio.run(main()) == ["x"]
