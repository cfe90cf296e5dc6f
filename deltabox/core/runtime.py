"""What the daemon keeps in memory about running sandboxes, and the context the core shares.

The database is the truth about sandboxes; this module holds what only a live daemon knows:

- `Runtime`: one running sandbox's init, its branch, and its locks, split by concern --
  the lifecycle `lock` (create/destroy/checkpoint/rollback/open-session are ordered by
  it), `session_locks` (one code run per session), the `standby` slot (its prepared
  incarnation, `StandbySlot`) and the `gate` a full checkpoint closes while it dumps
  (`DumpGate`).
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


@dataclass
class StandbySlot:
    """A sandbox's standby (or body double) for its head checkpoint."""
    built: Standby | None = None
    building: asyncio.Lock = field(default_factory=asyncio.Lock)  # one build at a time
    target: str = ""  # the checkpoint the newest standby request is for


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
        self._controls_idle = _open_event()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    @contextlib.asynccontextmanager
    async def busy(self):
        await self._open.wait()
        self.active += 1  # no await between the gate and this: atomic for the loop
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
    closed: bool = False  # destroyed: background work must not attach anything

    @contextlib.asynccontextmanager
    async def busy(self):
        async with self.gate.busy():
            with self.cut_by_lifecycle():
                yield

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
