"""When a full checkpoint gets a body double, and when a double may be built.

A body double is one CRIU restore paid ahead of time (`DeltaCR.build_double`): it makes a
rollback to its checkpoint a record swap (~1 ms instead of 100-300 ms), but it costs the
same CPU as the restore it replaces and is only worth it if it is used. Building one for
every checkpoint (`double-policy = always`) made an RL step (exec + full checkpoint, 20 %
of steps roll back) cost 1.7x plain CRIU's CPU. This module owns the decision
(docs/deltacr.md, "When a double is built"):

- A per-call hint (`Checkpoint(rollback_likely=...)`): true builds one, false none.
- `adaptive` (the default) learns each sandbox's habits (`Habits`): the exponentially
  weighted rate of rollbacks per checkpoint, the share of rollbacks whose target was
  hot (one of the sandbox's last K checkpoints), and the share that went back to the same
  checkpoint as the rollback before. Each hot checkpoint is used about
  rate x hot-share times on average, so a first double is built while that is at least
  `MIN_USES`, and a second one of the checkpoint just rolled back to while
  rate x again-share is. The estimates start at 1 (the `always` behaviour): a sandbox
  that never rolls back gets doubles for its first two full checkpoints only (the rate
  falls 1 -> 0.7 -> 0.49).
- `never`: only hinted checkpoints (and Warm-named ones) get doubles.

Filesystem (fs) checkpoints are not governed here: their standby is a fresh init (no
CRIU), cheap enough to keep always.

`BuildGate` is the daemon-wide limit on concurrent double builds
(`config.restore_parallelism`) and their yielding to clients: a build starts only at a
moment when no unary RPC is being served (`Metrics.in_flight`), waiting at most
`MAX_YIELD_S` -- so an exec, rollback or checkpoint never queues behind background
restores, and 64 sandboxes' checkpoints do not start 64 CRIU restores at once. A build a
call waits for (`Checkpoint(wait_ready)`) does not yield. When builds queue for a slot,
the one most likely to be used soon goes first (`DoublePolicy.build_priority`: its
sandbox's rollbacks per second times the share of them that hit a hot checkpoint; a build
a call waits for before any), not the first to ask: on a busy daemon the queue holds
dozens of builds, and a tree search's used double's replacement, needed within seconds,
must not wait behind the standbys of sandboxes that roll back once in a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from deltabox.metrics import CallsInFlight

__all__ = ["DoublePolicy", "Habits", "BuildGate", "POLICIES"]

log = structlog.get_logger("deltabox.core.double_policy")

POLICIES = ("always", "adaptive", "never")


@dataclass
class Habits:
    """What one sandbox has done lately (exponentially weighted, weight `ALPHA`)."""

    ALPHA = 0.3

    rate: float = 1.0          # rollbacks per checkpoint
    hot_share: float = 1.0     # of rollbacks, those to a hot checkpoint
    again_share: float = 1.0   # of rollbacks, those to the same checkpoint as the last one
    pending: int = 0           # rollbacks since the last checkpoint
    checkpoints: int = 0
    rollbacks: int = 0
    last_target: str = ""
    hints: dict[str, bool] = field(default_factory=dict)  # checkpoint -> rollback_likely
    # Rollbacks (full or fs) in time, for the build queue's order: the weighted interval
    # between two, starting from `PRIOR_INTERVAL_S` (one rollback is not a habit yet).
    PRIOR_INTERVAL_S = 10.0
    interval_s: float = PRIOR_INTERVAL_S
    last_rollback_at: float | None = None  # time.monotonic()

    def current_rate(self) -> float:
        """The rate with the rollbacks since the last checkpoint counted in."""
        if not self.pending:
            return self.rate
        return (1 - self.ALPHA) * self.rate + self.ALPHA * self.pending

    def expected_uses(self) -> float:
        """How often a hot checkpoint's double is used on average."""
        return self.current_rate() * self.hot_share

    def expected_reuses(self) -> float:
        """How often the checkpoint just rolled back to is rolled back to again next."""
        return self.current_rate() * self.again_share

    def rollbacks_per_s(self, now: float | None = None) -> float:
        """How often the sandbox rolls back lately (0 if it never did); it decays while
        the sandbox does not."""
        if self.last_rollback_at is None:
            return 0.0
        since = (time.monotonic() if now is None else now) - self.last_rollback_at
        return 1.0 / max(self.interval_s, since, 1e-3)

    def rolled_back_at(self, now: float | None = None) -> None:
        """A rollback (full or fs) began now."""
        now = time.monotonic() if now is None else now
        if self.last_rollback_at is not None:
            a = self.ALPHA
            self.interval_s = (1 - a) * self.interval_s + a * (now - self.last_rollback_at)
        self.last_rollback_at = now

    def checkpointed(self) -> None:
        if self.checkpoints:  # the first one closes no step
            self.rate = (1 - self.ALPHA) * self.rate + self.ALPHA * self.pending
        self.pending = 0
        self.checkpoints += 1

    def rolled_back(self, target: str, was_hot: bool) -> None:
        a = self.ALPHA
        self.hot_share = (1 - a) * self.hot_share + a * was_hot
        if self.rollbacks:
            self.again_share = (1 - a) * self.again_share + a * (target == self.last_target)
        self.pending += 1
        self.rollbacks += 1
        self.last_target = target

    def summary(self) -> dict:
        return {"rate": round(self.current_rate(), 3), "hot_share": round(self.hot_share, 3),
                "again_share": round(self.again_share, 3), "checkpoints": self.checkpoints,
                "rollbacks": self.rollbacks,
                "rollbacks_per_s": round(self.rollbacks_per_s(), 3)}


class DoublePolicy:
    """Per sandbox: whether a hot full checkpoint gets a double, and a second one."""

    MIN_USES = 0.5  # a double is built when it is expected to be used at least this often

    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"double policy must be one of {', '.join(POLICIES)}")
        self.policy = policy
        # Keyed by the sandbox's StandbySlot (it lives as long as the sandbox runs).
        self._habits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.urgent: set[str] = set()  # checkpoints a call waits on: their build never yields

    def habits(self, sandbox) -> Habits:
        return self._habits.setdefault(sandbox, Habits())

    def checkpointed(self, sandbox, checkpoint_id: str, full: bool,
                     hint: bool | None) -> None:
        """A full checkpoint was taken (an fs one teaches nothing about doubles)."""
        if not full:
            return
        h = self.habits(sandbox)
        h.checkpointed()
        if hint is not None:
            h.hints[checkpoint_id] = hint
        log.debug("double_policy.checkpoint", checkpoint=checkpoint_id,
                  hint=hint, wants=self.wants(sandbox, checkpoint_id), **h.summary())

    def rolled_back(self, sandbox, checkpoint_id: str, full: bool,
                    was_hot: bool) -> None:
        h = self.habits(sandbox)
        h.rolled_back_at()
        if full:
            h.rolled_back(checkpoint_id, was_hot)

    def build_priority(self, sandbox, checkpoint_id: str) -> float:
        """The build queue's order (`BuildGate`): a build a call waits for first, then
        by how soon the sandbox's incarnations are likely to be used -- its rollbacks per
        second times the share of them that went to a hot checkpoint. A sandbox that
        never rolled back comes last (first come, first served among equals)."""
        if checkpoint_id in self.urgent:
            return math.inf
        h = self._habits.get(sandbox)
        if h is None:
            return 0.0
        return h.rollbacks_per_s() * h.hot_share

    def max_yield_s(self, sandbox, checkpoint_id: str) -> float:
        """How long its build waits for a moment with no call in flight (`BuildGate.quiet`):
        `BuildGate.MAX_YIELD_S`, but no more than half the interval between the sandbox's
        rollbacks to hot checkpoints. Each rollback that used a double asks for one
        replacement and a sandbox's builds run one after another: a tree search rolling
        back every 0.3 s whose builds each waited a full second on a daemon that is never
        idle fell behind its own rollbacks, and each double missing is a CRIU restore
        after all -- in the caller's rollback, at full priority."""
        p = self.build_priority(sandbox, checkpoint_id)
        if p <= 0:
            return BuildGate.MAX_YIELD_S
        return min(BuildGate.MAX_YIELD_S, 0.5 / p)

    def wants(self, sandbox, checkpoint_id: str) -> bool:
        """Whether this hot full checkpoint should have a double."""
        h = self._habits.get(sandbox)
        hint = h.hints.get(checkpoint_id) if h is not None else None
        if hint is not None:
            return hint
        if self.policy == "always":
            return True
        if self.policy == "never":
            return False
        return h is None or h.expected_uses() >= self.MIN_USES

    def wants_pool(self, sandbox, checkpoint_id: str) -> bool:
        """Whether the checkpoint just rolled back to keeps more than one double."""
        if not self.wants(sandbox, checkpoint_id):
            return False
        if self.policy == "always":
            return True
        h = self._habits.get(sandbox)
        return h is None or h.expected_reuses() >= self.MIN_USES

    def forget_checkpoint(self, sandbox, checkpoint_id: str) -> None:
        h = self._habits.get(sandbox)
        if h is not None:
            h.hints.pop(checkpoint_id, None)
        self.urgent.discard(checkpoint_id)

    def forget(self, sandbox) -> None:
        self._habits.pop(sandbox, None)


class BuildGate:
    """At most `limit` double builds at once, daemon-wide (`slot`), each started when no
    client call is being served (`quiet`, at most `MAX_YIELD_S`; a build a call waits for
    skips it). Builds waiting for a slot get it by priority (highest first, evaluated when
    a slot frees; the first to ask among equals), not in the order they asked."""

    MAX_YIELD_S = 1.0

    def __init__(self, limit: int, calls: CallsInFlight) -> None:
        self.limit = max(1, limit)
        self.running = 0  # slots held
        self._queue: list[_Waiter] = []
        self._asked = 0  # waiters ever queued (their order among equal priorities)
        self._calls = calls
        self.yielded = 0  # builds that waited for a call to end (for tests and logs)

    @property
    def waiting(self) -> int:
        """Builds queued for a slot."""
        return len(self._queue)

    @contextlib.asynccontextmanager
    async def slot(self, priority: Callable[[], float] | None = None):
        """One of the `limit` slots; `priority()` orders the queue when there is one."""
        await self._acquire(priority or _zero)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Callable[[], float]) -> None:
        if self.running < self.limit and not self._queue:
            self.running += 1
            return
        waiter = _Waiter(self._asked, priority, asyncio.get_running_loop().create_future())
        self._asked += 1
        self._queue.append(waiter)
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self._release()  # granted, then cancelled before it could run
            elif waiter in self._queue:
                self._queue.remove(waiter)
            raise

    def _release(self) -> None:
        self.running -= 1
        while self.running < self.limit and self._queue:
            best = max(self._queue, key=_Waiter.order)
            self._queue.remove(best)
            if best.granted.done():  # cancelled meanwhile
                continue
            best.granted.set_result(None)
            self.running += 1

    async def quiet(self, max_s: float | None = None) -> None:
        """Until no unary call is in flight (at most `max_s`, MAX_YIELD_S by default)."""
        if self._calls.n <= 0:
            return
        max_s = self.MAX_YIELD_S if max_s is None else max_s
        self.yielded += 1
        try:
            await asyncio.wait_for(self._calls.idle(), max_s)
        except asyncio.TimeoutError:
            log.info("double_policy.yield_timed_out", calls_in_flight=self._calls.n,
                     after_s=round(max_s, 3))


def _zero() -> float:
    return 0.0


@dataclass(eq=False)
class _Waiter:
    asked: int
    priority: Callable[[], float]
    granted: asyncio.Future

    def order(self) -> tuple[float, int]:
        try:
            p = float(self.priority())
        except Exception:  # noqa: BLE001 - a broken estimate must not wedge the gate
            log.exception("double_policy.priority_failed")
            p = 0.0
        return (p, -self.asked)
