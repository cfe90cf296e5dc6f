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
call waits for (`Checkpoint(wait_ready)`) does not yield.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
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
                "rollbacks": self.rollbacks}


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
        if full:
            self.habits(sandbox).rolled_back(checkpoint_id, was_hot)

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
    """At most `limit` double builds at once, daemon-wide, each started when no client
    call is being served (or after `MAX_YIELD_S`)."""

    MAX_YIELD_S = 1.0

    def __init__(self, limit: int, calls: CallsInFlight) -> None:
        self._slots = asyncio.Semaphore(max(1, limit))
        self._calls = calls
        self.yielded = 0  # builds that waited for a call to end (for tests and logs)

    @contextlib.asynccontextmanager
    async def build(self, urgent: bool = False):
        async with self._slots:
            if not urgent:
                await self.quiet()
            yield

    async def quiet(self) -> None:
        """Until no unary call is in flight (at most MAX_YIELD_S)."""
        if self._calls.n <= 0:
            return
        self.yielded += 1
        try:
            await asyncio.wait_for(self._calls.idle(), self.MAX_YIELD_S)
        except asyncio.TimeoutError:
            log.info("double_policy.yield_timed_out", calls_in_flight=self._calls.n,
                     after_s=self.MAX_YIELD_S)
