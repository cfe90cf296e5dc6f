"""Work that waits until the current call's reply has left: the hot path's tail.

A call's reply should leave before the bookkeeping it causes starts (issue 10, target 6):
a rollback's metrics, log line and its background tasks (retiring the old tree, building
the next double) compete for the one event loop and the host's two cores with the reply.
`after_reply(fn, *args)` queues `fn(*args)` until the RPC in whose context it runs is
finished (the server's interceptor opens a `Reply` per unary call and runs it from
gRPC's done callback, i.e. once the status and message were handed to the transport).

Outside a call (a test driving the core, a background task of a call already answered)
`fn` runs at the loop's next turn. Only what may be lost in a crash belongs here: anything a
client relies on after an OK (the store commit) happens before the reply.
"""

from __future__ import annotations

import asyncio
import contextvars

import structlog

__all__ = ["Reply", "after_reply"]

log = structlog.get_logger("deltabox.core.after_reply")

_current: contextvars.ContextVar["Reply | None"] = contextvars.ContextVar(
    "deltabox_reply", default=None)


class Reply:
    """The calls to make once one RPC's reply has left."""

    # gRPC's done callback runs once the call ends, however it ends; should it ever
    # not, what waits runs this long after it was queued anyway.
    SAFETY_S = 1.0

    def __init__(self) -> None:
        self._calls: list = []
        self._sent = False
        self._timer: asyncio.TimerHandle | None = None

    def open(self) -> None:
        """Make this the current call's Reply (in this task, and the tasks it spawns)."""
        _current.set(self)

    def add(self, fn, *args) -> None:
        if self._sent:
            asyncio.get_running_loop().call_soon(_run, fn, args)
            return
        self._calls.append((fn, args))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.SAFETY_S, self.sent)

    def sent(self, *_ignored) -> None:
        """The reply left (or the call ended otherwise): run what waited for it."""
        self._sent = True
        if self._timer is not None:
            self._timer.cancel()
        calls, self._calls = self._calls, []
        for fn, args in calls:
            _run(fn, args)


def _run(fn, args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - one failed step must not stop the others
        log.error("after_reply.failed", call=getattr(fn, "__qualname__", repr(fn)),
                  error=f"{type(e).__name__}: {e}")


def after_reply(fn, *args) -> None:
    """Call `fn(*args)` on the event loop once the current RPC's reply has left (at the
    loop's next turn if no RPC is being answered)."""
    reply = _current.get()
    if reply is None:
        asyncio.get_running_loop().call_soon(_run, fn, args)
    else:
        reply.add(fn, *args)
