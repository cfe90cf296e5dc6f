"""What the daemon keeps in memory about running sandboxes, and the context the core shares.

The database is the truth about sandboxes; this module holds what only a live daemon knows:

- `Runtime`: one running sandbox's init, its branch, and its locks, split by concern --
  the lifecycle `lock` (create/destroy/checkpoint/rollback/open-session are ordered by
  it), `session_locks` (one code run per session), the `standby` slot (the prepared
  incarnations of its hot checkpoints, `StandbySlot`) and the `gate` a full checkpoint
  closes while it dumps (`DumpGate`).
- `CheckpointHolds`: checkpoints that operations in flight build on (a deletion waits).
- `SandboxContext`: what every part of the core needs -- the store, the config, the
  cgroup driver, CRIU, the metrics, the runtimes, the holds and the background tasks --
  passed to each part instead of the whole `SandboxManager`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from deltabox.config import Config
from deltabox.core import deltafs
from deltabox.errors import FailedPrecondition, Internal, InvalidArgument
from deltabox.host import initproto
from deltabox.host.cgroups import CgroupDriver
from deltabox.host.criu import Criu
from deltabox.metrics import Metrics
from deltabox.store.metadata import Store
from deltabox.store.records import SandboxRecord
from deltabox.types import SandboxState

__all__ = ["Standby", "StandbySlot", "DumpGate", "Runtime", "CheckpointHolds",
           "SandboxContext"]


@dataclass
class Standby:
    """A prepared incarnation of a checkpoint: its own branch with an init (a filesystem
    checkpoint's standby) or the checkpoint's processes restored and frozen (a full
    checkpoint's body double). Also what a warm pool holds."""
    branch_id: str
    checkpoint_id: str
    init_pid: int
    init_start: float
    layers: tuple[str, ...] = ()  # the checkpoint's mount layers it was built on


class StandbySlot:
    """A sandbox's prepared incarnations: body doubles (full) or standbys (fs) of its hot
    checkpoints -- the ones it made or rolled back to most recently, the pinned ones and
    those named in a Warm (`deltabox.core.standbys.Standbys` keeps the policy).

    `hot` orders them by last use (LRU); `doubles` holds the ready incarnations of each
    (more than one for the hottest, so back-to-back rollbacks to it all find one);
    `builds` counts the ones being made. Everything here lives on the event loop."""

    def __init__(self) -> None:
        self.hot: dict[str, float] = {}  # checkpoint -> last use (time.monotonic())
        self.used: set[str] = set()  # hot ones rolled back to: the hottest gets a pool
        self.doubles: dict[str, list[Standby]] = {}  # checkpoint -> ready incarnations
        self.builds: dict[str, int] = {}  # checkpoint -> incarnations being made
        self.filling: asyncio.Task | None = None  # the one filler: builds run one at a time
        self.unbuildable: set[str] = set()  # their build failed or did not fit the budget
        self._changed = asyncio.Event()  # set (and replaced) when a build ends

    def is_filling(self) -> bool:
        return self.filling is not None and not self.filling.done()

    def touch(self, checkpoint_id: str) -> None:
        self.hot.pop(checkpoint_id, None)
        self.hot[checkpoint_id] = time.monotonic()  # last in the dict: the hottest

    def hottest(self) -> list[str]:
        return sorted(self.hot, key=self.hot.__getitem__, reverse=True)

    def ready(self, checkpoint_id: str) -> int:
        return len(self.doubles.get(checkpoint_id, ()))

    def building(self, checkpoint_id: str) -> int:
        return self.builds.get(checkpoint_id, 0)

    def take(self, checkpoint_id: str) -> Standby | None:
        """A ready incarnation of the checkpoint (it leaves the slot), or None."""
        pool = self.doubles.get(checkpoint_id)
        if not pool:
            return None
        sb = pool.pop(0)  # the oldest: it has waited longest, its pages are settled
        if not pool:
            del self.doubles[checkpoint_id]
        return sb

    def put(self, sb: Standby) -> None:
        self.doubles.setdefault(sb.checkpoint_id, []).append(sb)
        self.changed()

    def remove(self, checkpoint_id: str) -> list[Standby]:
        """All ready incarnations of the checkpoint, out of the slot (to retire)."""
        return self.doubles.pop(checkpoint_id, [])

    def all(self) -> list[Standby]:
        return [sb for pool in self.doubles.values() for sb in pool]

    def build_started(self, checkpoint_id: str) -> None:
        self.builds[checkpoint_id] = self.builds.get(checkpoint_id, 0) + 1

    def build_ended(self, checkpoint_id: str) -> None:
        n = self.builds.pop(checkpoint_id, 0) - 1
        if n > 0:
            self.builds[checkpoint_id] = n
        self.changed()

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def next_change(self) -> None:
        await self._changed.wait()


def _open_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


class DumpGate:
    """Closed while a full checkpoint dumps: conversations with init arriving then wait.

    Long conversations (`busy`: exec, session code, shell) make a full checkpoint refuse
    (their connections to the daemon cannot be restored); short ones (`control`) make it
    wait for their end (`controls_done`)."""

    def __init__(self) -> None:
        self._open = _open_event()
        self.active = 0  # long conversations in flight
        self.controls = 0  # short conversations in flight
        self.calls = 0  # conversations ever begun (an unchanged sandbox had none since)
        self._controls_idle = _open_event()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    @contextlib.asynccontextmanager
    async def busy(self):
        await self._open.wait()
        self.active += 1  # no await between the gate and this: atomic for the loop
        self.calls += 1
        try:
            yield
        finally:
            self.active -= 1

    @contextlib.asynccontextmanager
    async def control(self):
        """A short conversation with init (a query, a signal, a detached spawn, a listing):
        it waits while a full checkpoint dumps, and a checkpoint waits for it to end
        instead of refusing, as it refuses while a long one (busy()) is attached."""
        await self._open.wait()
        self.controls += 1
        self.calls += 1
        self._controls_idle.clear()
        try:
            yield
        finally:
            self.controls -= 1
            if not self.controls:
                self._controls_idle.set()

    async def controls_done(self, name: str, timeout: float = 10.0) -> None:
        """Before a dump: let short conversations end; the gate is closed."""
        try:
            await asyncio.wait_for(self._controls_idle.wait(), timeout)
        except asyncio.TimeoutError:
            raise FailedPrecondition(f"{self.controls} short call(s) to sandbox {name}'s "
                                     f"init did not end within {timeout}s") from None


@dataclass
class Runtime:
    """What the daemon keeps in memory about a running sandbox."""
    init_pid: int
    branch_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # lifecycle changes
    session_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    own_layers: list[str] = field(default_factory=list)  # sunk by this branch
    manifest: deltafs.Manifest | None = None  # the upper at the last checkpoint
    standby: StandbySlot = field(default_factory=StandbySlot)
    gate: DumpGate = field(default_factory=DumpGate)
    last_cut: tuple | None = None  # the head checkpoint's frozen instant (core.snapshots)
    closed: bool = False  # destroyed: background work must not attach anything

    @contextlib.asynccontextmanager
    async def busy(self):
        async with self.gate.busy():
            with self.cut_by_lifecycle():
                yield

    def refuse_closed(self, name: str) -> None:
        """A call that got the lifecycle lock after a destroy (or the shutdown) began:
        refused, not started on a sandbox being torn down."""
        if self.closed:
            raise FailedPrecondition(f"sandbox {name} is being destroyed (or the daemon is "
                                     "stopping)")

    @contextlib.contextmanager
    def cut_by_lifecycle(self):
        """Around a call that talks to the init: if the sandbox is rolled back or
        destroyed meanwhile (its init killed under the call), the call fails as
        FAILED_PRECONDITION saying so -- not as an internal error."""
        init_pid = self.init_pid
        try:
            yield
        except Internal as e:
            if not self.closed and self.init_pid == init_pid:
                raise
            what = "destroyed" if self.closed else "rolled back"
            raise FailedPrecondition(f"the sandbox was {what} while the call ran; the "
                                     f"process it started is gone ({e})") from None

    def control(self):
        return self.gate.control()

    @property
    def channel(self) -> initproto.InitChannel:
        return initproto.InitChannel(self.init_pid)


class CheckpointHolds:
    """Checkpoints that operations in flight build on (a rollback, a fork, a body
    double, a warm pool being restored): their branches are not recorded yet and CRIU
    reads their images, so deleting them is ordered after them (`delete_checkpoint`).
    Counts live on the event loop; `busy` is also read by the store's deletion
    transaction in a worker thread (a dict lookup: atomic)."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._released = asyncio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, checkpoint_id: str):
        """Hold `checkpoint_id` (then read its record: a deletion that committed
        before the hold has made it NotFound; one after it waits)."""
        self._count[checkpoint_id] = self._count.get(checkpoint_id, 0) + 1
        try:
            yield
        finally:
            n = self._count.pop(checkpoint_id) - 1
            if n:
                self._count[checkpoint_id] = n
            self._released.set()
            self._released = asyncio.Event()

    def busy(self, checkpoint_ids) -> list[str]:
        return [c for c in checkpoint_ids if self._count.get(c)]

    async def wait_released(self, checkpoint_ids, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while busy := self.busy(checkpoint_ids):
            left = deadline - time.monotonic()
            if left <= 0:
                raise FailedPrecondition(f"checkpoint(s) {', '.join(busy)} are still in use "
                                         f"by a rollback, fork or warm-up after {timeout:.0f} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._released.wait(), left)


class SandboxContext:
    """The shared state of the core's parts (one per daemon)."""

    def __init__(self, config: Config, store: Store, cgroups: CgroupDriver, metrics: Metrics,
                 criu: Criu | None) -> None:
        self.config = config
        self.store = store
        self.cgroups = cgroups
        self.metrics = metrics
        self.criu = criu
        self.runtimes: dict[str, Runtime] = {}  # sandbox id -> its runtime, while running
        self.holds = CheckpointHolds()
        self.background: set[asyncio.Task] = set()
        self.stopping = False  # shutdown began: background work starts nothing new

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` in the background; shutdown waits for it."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def get(self, ref: str) -> SandboxRecord:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument("sandbox id or name is required")
        return self.store.get_sandbox(ref)

    def running(self, ref: str) -> tuple[SandboxRecord, Runtime]:
        rec = self.get(ref)
        rt = self.runtimes.get(rec.id)
        if rec.state != SandboxState.RUNNING or rt is None:
            raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}, not running")
        return rec, rt

    def require_criu(self) -> Criu:
        if self.criu is None:
            raise FailedPrecondition("full checkpoints need CRIU >= 4 (native/setup-host.sh "
                                     "criu installs it into /opt/deltabox/criu)")
        return self.criu

    def criu_build(self) -> str:
        return self.criu.build_id() if self.criu is not None else ""
