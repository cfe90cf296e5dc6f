"""Sandboxes: an overlay branch, a cgroup, namespaces and an init -- and their lifecycle.

`SandboxManager` is the core's one entry point (the daemon's servicers call only it). It
owns the lifecycle itself -- create, destroy, get, list -- and hands every other operation
to the part of `deltabox.core` that owns that mechanism, one per module:

    runtime.py      what a live daemon keeps per sandbox (locks, dump gate, standby slot),
                    checkpoint holds, and the context the parts share
    incarnation.py  starting and ending incarnations: mount + cgroup + init (or restore)
    reconcile.py    start-up reconcile (adopt, thaw, restart, strays), watching, shutdown
    snapshots.py    DeltaFS checkpoints and the checkpoint tree (diff, delete, pin, squash)
    deltacr.py      DeltaCR: full checkpoints, body doubles and standbys, restore, re-seed,
                    image dedup, the unusable-checkpoint verdict
    standbys.py     each sandbox's body doubles / standbys of its hot checkpoints
    double_policy.py  when a full checkpoint gets a body double; the build gate
    rollback.py     rollback (restore first, then switch)
    warm.py         warm pools for forks, and the one MemoryBudget
    fork.py         fork
    process.py      exec, detached execs, the shell
    sessions.py     sessions: their wire protocol and the embedded Python driver

The parts get the shared `SandboxContext` (store, config, cgroups, CRIU, metrics, runtimes,
holds, background tasks) and the peers they call, never this manager; the only thing passed
back is `_create_from`, a fork's cold path.

A sandbox is created in four steps, each undone in reverse if a later one fails:
record (store, state 'creating') -> mount the branch's overlay -> create the
cgroup with its limits -> launch ``deltabox-init`` (native/init), which
unshares pid/mount/uts/ipc/net namespaces, pivots into the branch, builds a
minimal /dev, drops capabilities and becomes pid 1. The record then turns
'running' with the init's (pid, start time): a pid alone may be reused.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import structlog

from deltabox.config import Config
from deltabox.core.deltacr import DeltaCR, Standbys
from deltabox.core.files import SandboxFiles
from deltabox.core.fork import Forks, auto_name
from deltabox.core.incarnation import Incarnations
from deltabox.core.process import ExecEvent, ProcessInfo, Processes, check_env
from deltabox.core.reconcile import Reconciler
from deltabox.core.rollback import Rollbacks
from deltabox.core.runtime import Runtime, SandboxContext
from deltabox.core.sessions import SESSION_KINDS, SessionResult, Sessions
from deltabox.core.snapshots import Snapshots
from deltabox.core.spec import check_limits, check_network
from deltabox.core.transfer import Transfers
from deltabox.core.warm import WarmPools
from deltabox.errors import FailedPrecondition, Internal
from deltabox.faults import crash_point
from deltabox.host import linux
from deltabox.host.cgroups import CgroupDriver
from deltabox.host.criu import Criu, find_criu
from deltabox.metrics import Metrics
from deltabox.store.metadata import Store
from deltabox.store.records import CheckpointRecord, SandboxRecord, validate_name
from deltabox.types import CheckpointMode, NetworkMode, SandboxState

__all__ = ["SandboxManager", "ExecEvent", "SessionResult", "ProcessInfo", "SESSION_KINDS"]

log = structlog.get_logger("deltabox.core.sandboxes")

DISK_BYTES_PER_INODE = 1024  # the default inode limit: one per KiB of the disk limit


class SandboxManager:
    def __init__(self, config: Config, store: Store, cgroups: CgroupDriver,
                 metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store
        self.cgroups = cgroups
        criu_binary = find_criu(config.criu_prefix)
        # Its helpers carry the store's instance id: orphans are found at start-up.
        self.criu = Criu(criu_binary, owner=store.instance_id) if criu_binary else None
        ctx = self._ctx = SandboxContext(config, store, cgroups, self.metrics, self.criu)
        self._create_lock = asyncio.Lock()  # name and NAT subnet allocation
        self._stopped_locks: dict[str, asyncio.Lock] = {}  # destroys of stopped sandboxes
        self._incarnations = Incarnations(ctx)
        self._processes = Processes(ctx)
        self._sessions = Sessions(ctx)
        self._deltacr = DeltaCR(ctx, self._incarnations, self._sessions)
        self._pools = WarmPools(ctx, self._deltacr, self._incarnations)
        self._standbys = Standbys(ctx, self._deltacr, self._incarnations, self._pools.budget)
        self._snapshots = Snapshots(ctx, self._deltacr, self._standbys, self._pools)
        self._rollbacks = Rollbacks(ctx, self._incarnations, self._deltacr, self._standbys)
        self._forks = Forks(ctx, self._deltacr, self._pools, self._create_from)
        self._reconciler = Reconciler(ctx, self._incarnations, self._standbys, self._pools)
        self._transfers = Transfers(ctx)

    # ---- start-up and shutdown (reconcile.py) ------------------------------------------

    async def start(self) -> dict:
        """Reconcile the kernel's state with the database; adopt or restart sandboxes."""
        return await self._reconciler.start()

    async def shutdown(self, keep_sandboxes: bool = False) -> None:
        """Stop every sandbox's processes and unmount its branch. Records stay
        'running', so the next start restarts them (files kept, processes fresh).
        `keep_sandboxes` (a daemon restart, `--on-exit`): drop only what no later daemon
        adopts (standbys, warm pools, background work); sandboxes stay running and
        mounted for the next start's reconcile to adopt, as after a crash. Full
        checkpoints in progress are aborted if the sandboxes stop (`abort_dumps`),
        finished if they live on."""
        if not keep_sandboxes:
            for rt in self._ctx.runtimes.values():
                rt.closed = True
            self._deltacr.abort_dumps()
        await self._reconciler.shutdown(keep_sandboxes)

    # ---- lifecycle -------------------------------------------------------------------

    async def create(self, image: str, name: str = "", memory_bytes: int = 0, pids: int = 0,
                     cpus: float = 0.0, network: str = NetworkMode.NONE, env: dict | None = None,
                     hostname: str = "", disk_bytes: int = 0,
                     disk_inodes: int = 0) -> SandboxRecord:
        check_limits(memory_bytes, pids, cpus, disk_bytes, disk_inodes)
        check_network(network)
        env = dict(env or {})
        check_env(env)
        name = validate_name(name, "sandbox") if name else auto_name()
        hostname = validate_name(hostname or name, "host")
        disk_bytes = disk_bytes or self.config.default_disk_bytes
        spec = {"memory_bytes": memory_bytes or self.config.default_memory_bytes,
                "pids": pids or self.config.default_pids, "cpus": cpus, "network": network,
                "env": env, "hostname": hostname, "disk_bytes": disk_bytes,
                # Inodes cost the store space the block limit does not count.
                "disk_inodes": disk_inodes or disk_bytes // DISK_BYTES_PER_INODE}
        return await self._create_from(image, name, spec, "")

    async def _create_from(self, image: str, name: str, spec: dict, checkpoint_id: str,
                           restore_from: Path | None = None,
                           fork_index: int = -1) -> SandboxRecord:
        """Record, launch (a fresh init, or `restore_from` a checkpoint's images: a fork's
        cold child, re-seeded as child `fork_index`), then mark running."""
        inc = self._incarnations
        spec = dict(spec)
        async with self._create_lock:
            if spec["network"] == NetworkMode.NAT:
                from deltabox.host import network as net
                used = {r.spec["net_index"] for r in self.store.list_sandboxes()
                        if "net_index" in r.spec}
                spec["net_index"] = net.allocate_index(used)
                spec["ip_address"] = net.addresses(spec["net_index"])[1]
            rec = await asyncio.to_thread(self.store.create_sandbox, name, image, spec,
                                          checkpoint_id)
        rt = Runtime(0, rec.branch_id)
        try:
            rt.init_pid, start = await asyncio.to_thread(
                inc.launch, rec, self.store.branch_mount(rec.branch_id), True, restore_from)
            crash_point("fork.launched" if checkpoint_id else "create.launched")
            if restore_from is not None and fork_index >= 0:
                await self._deltacr.reseed(rt, fork_index)
            await asyncio.to_thread(self.store.set_sandbox_state, rec.id, SandboxState.RUNNING,
                                    rt.init_pid, start)
        except BaseException:
            await asyncio.to_thread(inc.kill, rec.branch_id, rt.init_pid, rec)
            await asyncio.to_thread(self.store.delete_sandbox, rec.id)
            raise
        self._ctx.runtimes[rec.id] = rt
        log.info("sandbox.created", sandbox=rec.id, name=name, image=image,
                 checkpoint=checkpoint_id or None)
        return self.store.get_sandbox(rec.id)

    async def destroy(self, ref: str) -> None:
        """Kill the sandbox's processes, tear down its incarnations and delete its record
        (its checkpoints stay). Its background builds are cancelled, not waited for
        (`Standbys.cancel`): a destroy costs its own teardown and at most one restore in
        flight, however many builds other sandboxes have queued (tests/test_teardown.py).
        The phases' times are in the `sandbox.destroyed` log line."""
        rec = self.get(ref)
        rt = self._ctx.runtimes.get(rec.id)
        # A stopped sandbox has no runtime: its destroys still go one at a time.
        lock = rt.lock if rt else self._stopped_locks.setdefault(rec.id, asyncio.Lock())
        t0, timings = time.perf_counter(), {}
        if rt is not None:
            # Before waiting for the lock: the calls queued on it refuse (closed), and the
            # CRIU work of the one holding it -- a full checkpoint's dump, a rollback's
            # restore -- is aborted, not waited for (a CRIU that hangs would hold this
            # destroy until CRIU's timeout, 120 s).
            rt.closed = True
            dumps = self._deltacr.abort_dumps(rec.id)
            restores = await asyncio.to_thread(self._incarnations.abort_restores, rec.id)
            if dumps or restores:
                log.info("sandbox.criu_aborted", sandbox=rec.id, dumps=dumps,
                         restores=restores)
        async with lock:
            t_locked = time.perf_counter()
            # Read again under the lock: a rollback that held it switched the branch
            # (the old one is being retired; the new one must be killed), or another
            # destroy that held it already deleted the sandbox (NOT_FOUND).
            rec = self.get(rec.id)
            init_pid = rt.init_pid if rt else rec.init_pid
            # Marked first: a daemon killed half way through must not bring the sandbox
            # back at its next start (a 'broken' record is torn down there).
            await asyncio.to_thread(self.store.set_sandbox_state, rec.id, SandboxState.BROKEN)
            try:
                if rt is not None:
                    # Its builds waiting for a slot are dropped, one in flight (or a
                    # rollback's losing restore) is aborted, not waited for.
                    t_marked = time.perf_counter()
                    await self._standbys.cancel(rec.id, rt)
                    t_cancelled = time.perf_counter()
                    await self._standbys.drop(rt)
                    timings["cancel_ms"] = _ms(t_marked, t_cancelled)
                    timings["drop_ms"] = _ms(t_cancelled, time.perf_counter())
                t_builds = time.perf_counter()
                await asyncio.to_thread(self._incarnations.kill, rec.branch_id, init_pid, rec)
                crash_point("destroy.killed")
            except Exception as e:
                await asyncio.to_thread(self.store.set_sandbox_state, rec.id,
                                        SandboxState.BROKEN)
                raise Internal(f"destroying {rec.id} failed half way ({e}); it is marked broken, "
                               "destroy it again or restart the daemon") from e
            self._ctx.runtimes.pop(rec.id, None)
            await asyncio.to_thread(self.store.delete_sandbox, rec.id)
            self._stopped_locks.pop(rec.id, None)
        t_end = time.perf_counter()
        log.info("sandbox.destroyed", sandbox=rec.id, lock_ms=_ms(t0, t_locked),
                 kill_ms=_ms(t_builds, t_end), total_ms=_ms(t0, t_end), **timings)

    def get(self, ref: str) -> SandboxRecord:
        return self._ctx.get(ref)

    def list(self) -> list[SandboxRecord]:
        return self.store.list_sandboxes()

    def files(self, ref: str) -> SandboxFiles:
        rec = self.get(ref)
        root = self.store.mnt_dir / rec.branch_id
        if not linux.is_mountpoint(root):
            raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}: its files are not "
                                     "mounted")
        return SandboxFiles(root, self.config.max_file_read_bytes)

    # ---- checkpoints (snapshots.py, deltacr.py), rollback, warm pools and fork ---------

    async def checkpoint(self, ref: str, label: str = "", mode: str = CheckpointMode.FS,
                         wait_ready: bool = False,
                         rollback_likely: bool | None = None,
                         background: bool = False) -> CheckpointRecord:
        """Checkpoint a sandbox; its body double (full) or standby (fs) is then built
        in the background -- or before returning, with `wait_ready` (see `ready`).
        `background`: return once the cut is taken, record it afterwards (`pending`)."""
        return await self._snapshots.checkpoint(ref, label, mode, wait_ready, rollback_likely,
                                                background)

    def pending(self, checkpoint_id: str) -> bool:
        """Whether a background checkpoint is still being recorded (not durable yet)."""
        return self._snapshots.pending(checkpoint_id)

    async def settled(self, *refs: str) -> None:
        """Wait for the pending background checkpoints among `refs` (or raise the error
        one hit): every call that names a checkpoint goes through here first."""
        await self._snapshots.settled(*refs)

    async def wait_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        """A checkpoint once recorded, or the error its background recording hit."""
        return await self._snapshots.wait_checkpoint(checkpoint_id)

    def ready(self, checkpoint_id: str) -> bool:
        """Whether a body double (full) or standby (fs) of the checkpoint is built and
        waiting: a rollback to it now takes the "double" / "standby" path."""
        return self._standbys.ready(checkpoint_id)

    async def rollback(self, ref: str, checkpoint_id: str) -> tuple[SandboxRecord, str, dict]:
        """Roll the sandbox back to a checkpoint: (record, path taken, timings in ms).
        See `deltabox.core.rollback`."""
        await self.settled(checkpoint_id)
        return await self._rollbacks.rollback(ref, checkpoint_id)

    async def warm(self, checkpoint_id: str, n: int, wait: bool = False) -> int:
        """Prepare up to n incarnations of a checkpoint for a coming fork; how many are
        ready (after preparing them, if `wait`)."""
        await self.settled(checkpoint_id)
        return await self._pools.warm(checkpoint_id, n, wait)

    async def fork(self, checkpoint_id: str, n: int) -> list[SandboxRecord | Exception]:
        """n new sandboxes from a checkpoint; one result (record or error) per child."""
        await self.settled(checkpoint_id)
        return await self._forks.fork(checkpoint_id, n)

    async def list_checkpoints(self, ref: str) -> list[CheckpointRecord]:
        """The sandbox's tree, once its pending background checkpoints are recorded."""
        await self._snapshots.settled_sandbox(self.get(ref).id)
        return self._snapshots.list_checkpoints(ref)

    async def diff(self, a: str, b: str) -> list[tuple[str, str]]:
        await self.settled(a, b)
        return await self._snapshots.diff(a, b)

    async def delete_checkpoint(self, checkpoint_id: str, cascade: bool) -> list[str]:
        """Delete a checkpoint (with cascade, its subtree), after the rollbacks, forks
        and double builds in flight on any of them."""
        await self.settled(checkpoint_id)
        return await self._snapshots.delete_checkpoint(checkpoint_id, cascade)

    async def pin_checkpoint(self, checkpoint_id: str, pinned: bool) -> CheckpointRecord:
        await self.settled(checkpoint_id)
        return self._snapshots.pin_checkpoint(checkpoint_id, pinned)

    # ---- moving checkpoints between daemons (transfer.py) --------------------------------

    async def checkpoint_manifest(self, checkpoint_id: str):
        """The checkpoint's manifest (layer digests, host facts); see core/transfer.py."""
        await self.settled(checkpoint_id)
        return await self._transfers.manifest(checkpoint_id)

    async def have_layers(self, digests: list[str]) -> list[str]:
        return await self._transfers.have_layers(digests)

    def export_checkpoint(self, checkpoint_id: str, skip_layers: list[str]):
        """The checkpoint as a transfer stream (an async iterator of chunks)."""
        return self._transfers.export(checkpoint_id, skip_layers)

    async def import_checkpoint(self, chunks) -> CheckpointRecord:
        """Import a transfer stream: a detached checkpoint that Fork can use."""
        return await self._transfers.import_stream(chunks)

    # ---- exec, detached execs and the shell (process.py) ---------------------------------

    def exec(self, ref: str, argv: list[str], env: dict | None = None, cwd: str = "/",
             stdin: bytes = b"", timeout: float = 0.0,
             max_output: int = 0) -> AsyncIterator[ExecEvent]:
        """Run argv in the sandbox; yields started, stdout/stderr chunks, then exit."""
        return self._processes.exec(ref, argv, env, cwd, stdin, timeout, max_output)

    async def exec_detached(self, ref: str, argv: list[str], env: dict | None = None,
                            cwd: str = "/", stdin: bytes = b"") -> ProcessInfo:
        """Start argv and return at once with its handle; stdin is written, then closed."""
        return await self._processes.exec_detached(ref, argv, env, cwd, stdin)

    async def list_processes(self, ref: str) -> list[ProcessInfo]:
        """Detached execs, running or ended (init remembers the 32 that ended last)."""
        return await self._processes.list_processes(ref)

    async def get_process(self, ref: str, process_id: str) -> ProcessInfo:
        return await self._processes.get_process(ref, process_id)

    async def signal_process(self, ref: str, process_id: str, sig: int) -> ProcessInfo:
        """Send `sig` to the process group of a running detached exec."""
        return await self._processes.signal_process(ref, process_id, sig)

    async def wait_process(self, ref: str, process_id: str, timeout: float = 0.0) -> ProcessInfo:
        """Wait until the detached exec ends; DeadlineExceeded after `timeout` (0 = none)."""
        return await self._processes.wait_process(ref, process_id, timeout)

    def process_logs(self, ref: str, process_id: str,
                     follow: bool = False) -> AsyncIterator[ExecEvent]:
        """The kept output of a detached exec, then `exit` if it has ended; `follow`
        relays live output until it ends."""
        return self._processes.process_logs(ref, process_id, follow)

    def shell(self, ref: str, argv: list[str], env: dict | None, rows: int, cols: int,
              inputs: AsyncIterator[tuple[str, object]]) -> AsyncIterator[ExecEvent]:
        """A pty-backed process; `inputs` yields ('stdin', bytes) or ('resize', (r, c))."""
        return self._processes.shell(ref, argv, env, rows, cols, inputs)

    # ---- sessions (sessions.py) -----------------------------------------------------------

    async def open_session(self, ref: str, kind: str = "bash", name: str = "",
                           env: dict | None = None, cwd: str = "/") -> tuple[str, int]:
        return await self._sessions.open(ref, kind, name, env, cwd)

    async def list_sessions(self, ref: str) -> list[tuple[str, str, int]]:
        return await self._sessions.list(ref)

    async def close_session(self, ref: str, name: str) -> None:
        await self._sessions.close(ref, name)

    async def run_in_session(self, ref: str, name: str, code: str,
                             timeout: float = 0.0) -> SessionResult:
        return await self._sessions.run(ref, name, code, timeout)


def _ms(a: float, b: float) -> float:
    """perf_counter() interval a..b in milliseconds (for the logs)."""
    return round(1000 * (b - a), 1)
