"""Sandboxes: an overlay branch, a cgroup, namespaces and an init -- and their lifecycle.

A sandbox is created in four steps, each undone in reverse if a later one fails:
record (store, state 'creating') -> mount the branch's overlay -> create the
cgroup with its limits -> launch ``deltabox-init`` (native/init), which
unshares pid/mount/uts/ipc/net namespaces, pivots into the branch, builds a
minimal /dev, drops capabilities and becomes pid 1. The record then turns
'running' with the init's (pid, start time): a pid alone may be reused.

Everything that runs in a sandbox is a child of its init, reached over a unix
socket inside the sandbox (`deltabox.host.initproto`), so the whole tree stays
inside the namespaces and the cgroup -- and can be checkpointed later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import psutil
import structlog

from deltabox.host import linux
from deltabox.core import deltafs
from deltabox.host import initproto
from deltabox.host.cgroups import CgroupDriver, Limits
from deltabox.config import Config, init_binary
from deltabox.host.criu import Criu, CriuError, find_criu
from deltabox.errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
                             ProcessNotFound, SessionNotFound,
                             NotFound, ResourceExhausted)
from deltabox.faults import crash_point
from deltabox.core.files import SandboxFiles
from deltabox.metrics import Metrics
from deltabox.store.metadata import (CheckpointInUse, CheckpointRecord, Mount, SandboxRecord, Store,
                            _rmtree, new_id, validate_name)

__all__ = ["SandboxManager", "ExecEvent", "SessionResult", "ProcessInfo", "SESSION_KINDS"]

log = structlog.get_logger("deltabox.core.sandboxes")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SESSION_KINDS = ("bash", "sh", "python")
PROCESS_PREFIX = "exec/"  # init's name of a detached exec: exec/<process id>
PROCESS_TAIL_BYTES = 1 << 20  # what init keeps of each stream of a detached exec
MAX_DETACHED_STDIN = 1 << 20  # init buffers this much without the process reading it
MAX_ENV_BYTES = 1 << 20
DISK_BYTES_PER_INODE = 1024  # the default inode limit: one per KiB of the disk limit
DELETE_WAIT_S = 150.0  # a deletion waits this long for rollbacks/forks of it (> CRIU's timeout)


@dataclass
class ExecEvent:
    kind: str  # started | stdout | stderr | exit
    data: bytes = b""
    pid: int = 0
    exit_code: int = 0
    signal: int = 0
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0


@dataclass
class SessionResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    duration: float


@dataclass
class ProcessInfo:
    """A detached exec: a process the sandbox's init keeps a record of (a *kept*
    process, docs/init-protocol.md), named by `id`."""
    id: str
    pid: int
    command: str
    running: bool
    exit_code: int = 0  # once ended; -1 when killed by a signal
    signal: int = 0
    stdout_bytes: int = 0  # everything it wrote; init keeps the newest PROCESS_TAIL_BYTES
    stderr_bytes: int = 0

    @classmethod
    def from_state(cls, process_id: str, st: initproto.ProcessState) -> "ProcessInfo":
        code, sig = _wait_status(st.status) if st.status is not None else (0, 0)
        return cls(process_id, st.pid, st.command, st.status is None, code, sig,
                   st.stdout_bytes, st.stderr_bytes)


@dataclass
class _Standby:
    branch_id: str
    checkpoint_id: str
    init_pid: int
    init_start: float


@dataclass
class _Runtime:
    """What the daemon keeps in memory about a running sandbox."""
    init_pid: int
    branch_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # lifecycle changes
    session_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    own_layers: list[str] = field(default_factory=list)  # sunk by this branch
    manifest: deltafs.Manifest | None = None  # the upper at the last checkpoint
    standby: _Standby | None = None
    standby_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one build at a time
    standby_target: str = ""  # the checkpoint the newest standby request is for
    active: int = 0  # conversations with init in flight (exec, session code, shell)
    # Closed while a full checkpoint dumps: new conversations wait for it.
    gate: asyncio.Event = field(default_factory=lambda: _open_event())
    controls: int = 0  # short conversations in flight (see control())
    controls_idle: asyncio.Event = field(default_factory=lambda: _open_event())
    closed: bool = False  # destroyed: background work must not attach anything

    @contextlib.asynccontextmanager
    async def busy(self):
        await self.gate.wait()
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
        await self.gate.wait()
        self.controls += 1
        self.controls_idle.clear()
        try:
            yield
        finally:
            self.controls -= 1
            if not self.controls:
                self.controls_idle.set()

    @property
    def channel(self) -> initproto.InitChannel:
        return initproto.InitChannel(self.init_pid)


def _wait_status(status: int) -> tuple[int, int]:
    """(exit_code, signal) from a raw wait status; exit_code -1 when signalled."""
    if os.WIFSIGNALED(status):
        return -1, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _process_start(pid: int) -> float:
    """When `pid` started, in seconds since boot (0.0 if it is gone): with the pid, the
    identity of a sandbox's init. Not wall-clock time: that is derived from the boot
    time the kernel reports, which moves whenever the clock is stepped, and an init
    that no longer matches its record would be restarted (its sessions lost)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19]) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _same_process(pid: int, recorded_start: float) -> bool:
    """Is `pid` the process recorded with `recorded_start`? Records written before
    start times were boot-relative hold wall-clock times (> 1e9): those compare, to
    the second, with the wall-clock start (the boot time may have moved since)."""
    if not pid:
        return False
    if recorded_start < 1e9:
        return _process_start(pid) == recorded_start
    try:
        return abs(psutil.Process(pid).create_time() - recorded_start) < 2.0
    except psutil.Error:
        return False


class _CheckpointHolds:
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


class SandboxManager:
    def __init__(self, config: Config, store: Store, cgroups: CgroupDriver,
                 metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store
        self.cgroups = cgroups
        self._runtime: dict[str, _Runtime] = {}
        self._monitor: asyncio.Task | None = None
        self._create_lock = asyncio.Lock()  # name and NAT subnet allocation
        self._pools: dict[str, list[_Standby]] = {}  # warm incarnations for forks
        self._pool_used: dict[str, float] = {}      # checkpoint -> last use (LRU)
        self._warm_sem = asyncio.Semaphore(2)        # restores in parallel (2 cores here)
        criu_binary = find_criu()
        # Its helpers carry the store's instance id: orphans are found at start-up.
        self.criu = Criu(criu_binary, owner=store.instance_id) if criu_binary else None
        self._holds = _CheckpointHolds()
        self._background: set[asyncio.Task] = set()
        self._stopping = False
        self._to_reap: set[int] = set()  # killed inits not yet waited for
        self._squash_lock = asyncio.Lock()  # one squash at a time: it is I/O heavy

    def _spawn_background(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---- start-up and shutdown -----------------------------------------------------

    async def start(self) -> dict:
        """Reconcile the kernel's state with the database; adopt or restart sandboxes."""
        report = await asyncio.to_thread(self._reconcile)
        self._monitor = asyncio.create_task(self._watch_inits())
        return report

    def _reconcile(self) -> dict:
        report = {"adopted": 0, "restarted": 0, "failed": 0, "removed": 0, "stray_mounts": 0,
                  "stray_cgroups": 0, "thawed": 0, "orphaned_criu": 0}
        # First the CRIU helpers a killed daemon left running: a dump still writes
        # into tmp/ and holds its sandbox seized and frozen, a restore forks into a
        # stray cgroup. They are given a moment to finish (killing a dump midway
        # can leave its parasite in a process), then killed.
        if self.criu is not None:
            report["orphaned_criu"] = self.criu.end_orphans()
        records = {r.id: r for r in self.store.list_sandboxes()}
        branches = {r.branch_id for r in records.values()}
        # Anything not on a recorded branch (e.g. a standby of a crashed daemon) goes.
        for target in linux.mounts_under(self.store.mnt_dir):
            if target != str(self.store.mnt_dir) and Path(target).name not in branches:
                linux.umount(target, linux.MNT_DETACH)
                report["stray_mounts"] += 1
        for name in self.cgroups.names() - branches:
            try:
                self.cgroups.kill_all(name)
                self.cgroups.remove(name)
                report["stray_cgroups"] += 1
            except (OSError, TimeoutError) as e:  # one bad stray must not stop start-up
                log.error("reconcile.stray_cgroup_failed", cgroup=name, error=str(e))
        for rec in records.values():
            if rec.state in ("creating", "broken"):
                self._kill_incarnation(rec.branch_id, rec.init_pid, rec)
                self.store.delete_sandbox(rec.id)
                report["removed"] += 1
            elif rec.state == "running":
                rt = _Runtime(rec.init_pid, rec.branch_id)
                if _same_process(rec.init_pid, rec.init_start) \
                        and rec.init_pid in self.cgroups.pids(rec.branch_id) \
                        and self._thaw_adopted(rec, report):
                    report["adopted"] += 1
                    if rec.init_start >= 1e9:  # a wall-clock start: record it boot-relative
                        self.store.set_sandbox_state(rec.id, "running", rec.init_pid,
                                                     _process_start(rec.init_pid))
                else:
                    self.cgroups.kill_all(rec.branch_id)
                    try:
                        rt.init_pid, start = self._launch(rec,
                                                          self.store.branch_mount(rec.branch_id))
                    except Exception as e:  # noqa: BLE001 - one sandbox must not stop the daemon
                        # Its tree may be what refuses (root inside can break its own
                        # launch): it stays recorded, stopped, files kept.
                        log.error("reconcile.restart_failed", sandbox=rec.id, error=str(e))
                        self._kill_incarnation(rec.branch_id, 0)
                        self.store.set_sandbox_state(rec.id, "stopped")
                        report["failed"] += 1
                        continue
                    self.store.set_sandbox_state(rec.id, "running", rt.init_pid, start)
                    report["restarted"] += 1
                self._recover_manifest(rec, rt)
                self._runtime[rec.id] = rt
            crash_point("reconcile")
        report.update(self.store.reconcile_disk())
        self.store.gc_layers()
        log.info("sandbox.reconciled", **report)
        return report

    def _thaw_adopted(self, rec: SandboxRecord, report: dict) -> bool:
        """Thaw an adopted sandbox: a daemon killed during a checkpoint (sink or dump)
        or a rollback to a body double (switched, not yet resumed) left it frozen,
        and every call into it would hang. False if it cannot be thawed (it is then
        restarted on its branch)."""
        try:
            if not self._is_frozen(rec.branch_id):
                return True
            self.cgroups.thaw(rec.branch_id)
        except (OSError, TimeoutError) as e:
            log.error("reconcile.thaw_failed", sandbox=rec.id, error=str(e))
            return False
        log.warning("reconcile.thawed", sandbox=rec.id)
        report["thawed"] += 1
        return True

    def _is_frozen(self, name: str) -> bool:
        """Whether the cgroup is frozen or freezing (v1 freezer.state, v2 cgroup.events)."""
        d = self.cgroups.freezer_path(name)
        if (d / "freezer.state").exists():
            return (d / "freezer.state").read_text().strip() != "THAWED"
        return "frozen 1" in (d / "cgroup.events").read_text() \
            or (d / "cgroup.freeze").read_text().strip() == "1"

    def _recover_manifest(self, rec: SandboxRecord, rt: _Runtime) -> None:
        """After a restart: which layers this branch sank, and a manifest naming
        their paths (keys unknown, so the next checkpoint re-sinks the upper)."""
        lower = self.store.get_branch(rec.branch_id).lower
        if rec.head:
            layers = self.store.get_checkpoint(rec.head).layers
            if layers[:len(lower)] == lower:
                rt.own_layers = list(layers[len(lower):])
        rt.manifest = deltafs.manifest_from_layers(
            self.store.layer_path(lid) for lid in rt.own_layers)

    async def shutdown(self) -> None:
        """Stop every sandbox's processes and unmount its branch. Records stay
        'running', so the next start restarts them (files kept, processes fresh)."""
        if self._monitor:
            self._monitor.cancel()
        self._stopping = True
        for rt in self._runtime.values():
            rt.closed = True
        # Let background work (standbys, warm pools, squashes) finish rather than
        # cancel it mid-restore: a cancelled task leaves its worker thread running
        # and what it creates unretired. They are bounded by CRIU's timeout.
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        for rt in self._runtime.values():
            async with rt.standby_lock:  # an in-flight build retires itself (closed)
                pass
        for rt in self._runtime.values():
            await self._drop_standby(rt)
        for cid in list(self._pools):
            await self._drop_pool(cid)
        # Every recorded sandbox, running or not (a stopped one is still mounted).
        for rec in await asyncio.to_thread(self.store.list_sandboxes):
            rt = self._runtime.get(rec.id)
            await asyncio.to_thread(self._kill_incarnation, rec.branch_id,
                                    rt.init_pid if rt else rec.init_pid, rec)
        self._runtime.clear()
        # Then whatever no record or pool names (an incarnation some failed step left
        # behind): its processes and mounts would keep the store busy, its loop attached.
        await asyncio.to_thread(self._sweep_strays)
        await asyncio.to_thread(self.cgroups.release_parents)

    def _sweep_strays(self) -> None:
        for name in self.cgroups.names():
            log.error("shutdown.stray_cgroup", cgroup=name)
            try:
                self._kill_incarnation(name, 0)
            except (OSError, TimeoutError) as e:
                log.error("shutdown.stray_cgroup_failed", cgroup=name, error=str(e))
        for target in linux.mounts_under(self.store.mnt_dir):
            if target != str(self.store.mnt_dir):
                log.error("shutdown.stray_mount", mount=target)
                linux.umount(target, linux.MNT_DETACH)

    def _reap(self) -> None:
        """waitpid() the killed inits that have exited (never -1: that would steal
        the exit status of the daemon's other children, e.g. a launcher's)."""
        for pid in list(self._to_reap):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child, or already reaped
                done = pid
            if done:
                self._to_reap.discard(pid)

    async def _watch_inits(self) -> None:
        """Mark sandboxes whose init died as 'stopped' (and reap the init)."""
        while True:
            await asyncio.sleep(1.0)
            self._reap()
            for sid, rt in list(self._runtime.items()):
                if rt.lock.locked():
                    continue
                if not _alive(rt.init_pid):
                    log.warning("sandbox.init_died", sandbox=sid, pid=rt.init_pid)
                    self._runtime.pop(sid, None)
                    await self._drop_standby(rt)
                    await asyncio.to_thread(self.store.set_sandbox_state, sid, "stopped")

    # ---- incarnations: a branch mounted, a cgroup, an init ------------------------------

    def _launch(self, rec: SandboxRecord, mnt: Mount, network: bool = True,
                restore_from: Path | None = None, stopped: bool = False) -> tuple[int, float]:
        """Mount a branch, create its cgroup, start the sandbox; (pid, start time).

        It starts with a fresh init, or -- `restore_from` a checkpoint's process
        images (DeltaCR) -- with the checkpoint's processes, left stopped if
        `stopped` (a body double). The cgroup is named after the branch: every
        rollback makes a new branch, so an incarnation being torn down never
        shares a cgroup with its successor.
        """
        branch_id = Path(mnt.target).name
        Path(mnt.target).mkdir(exist_ok=True)
        if not linux.is_mountpoint(mnt.target):
            mnt.mount()
        limits = Limits(rec.spec["memory_bytes"], rec.spec["pids"], rec.spec["cpus"])
        procs = self.cgroups.create(branch_id, limits)
        if restore_from is not None:
            def freeze(criu_pid: int) -> None:  # see Criu.restore: a frozen body double
                self.cgroups.move_to_own_cgroups(criu_pid)
                self.cgroups.freeze(branch_id)
            pid = self._require_criu().restore(restore_from, Path(mnt.target), procs,
                                               freeze if stopped else None)
            return pid, _process_start(pid)
        argv = [str(init_binary()), "--rootfs", mnt.target, "--hostname", rec.spec["hostname"]]
        for p in procs:
            argv += ["--cgroup-procs", str(p)]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise Internal(f"starting the sandbox's init failed: {res.stderr.strip()}")
        pid = int(res.stdout.split()[0])
        if network and rec.spec.get("network") == "nat":
            self._attach_network(rec, pid, Path(mnt.target))
        return pid, _process_start(pid)

    def _require_criu(self) -> Criu:
        if self.criu is None:
            raise FailedPrecondition("full checkpoints need CRIU >= 4 (native/setup-host.sh "
                                     "criu installs it into /opt/deltabox/criu)")
        return self.criu

    def _images_for(self, ckpt: CheckpointRecord) -> Path | None:
        return self.store.images_path(ckpt.id) if ckpt.mode == "full" else None

    def _resume(self, branch_id: str) -> None:
        """Thaw a body double: its processes go on exactly where the dump left them
        (no signal is delivered to them)."""
        self.cgroups.thaw(branch_id)

    def _refuse_stopped(self, rec: SandboxRecord, branch_id: str) -> None:
        """CRIU cannot seize a job-control-stopped task in a frozen cgroup (it hangs
        in the kernel): refuse before freezing, naming the process."""
        for pid in self.cgroups.pids(branch_id):
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                if state in ("T", "t"):
                    from deltabox.host.criu import _sandbox_pid
                    raise FailedPrecondition(
                        f"{_sandbox_pid(pid)} in sandbox {rec.name} is stopped (SIGSTOP or "
                        "job control); CRIU cannot checkpoint a stopped process in a frozen "
                        "sandbox: continue it (kill -CONT) first")

    def _attach_network(self, rec: SandboxRecord, pid: int, root: Path) -> None:
        from deltabox.host import network as net
        net.attach_nat(rec.id, pid, rec.spec["net_index"])
        servers = net.host_nameservers()
        if servers:
            SandboxFiles(root, 1 << 20).write(
                "/etc/resolv.conf", "".join(f"nameserver {s}\n" for s in servers).encode())

    def _kill_incarnation(self, branch_id: str, init_pid: int,
                          rec: SandboxRecord | None = None) -> None:
        """Kill an incarnation's processes, remove its cgroup, unmount its branch."""
        self.cgroups.kill_all(branch_id)
        self.cgroups.remove(branch_id)
        if init_pid:
            # The daemon is a subreaper (and restores are its children): the
            # killed init is ours to reap, once it has exited -- see _reap.
            self._to_reap.add(init_pid)
            self._reap()
        if rec is not None and rec.spec.get("network") == "nat" \
                and rec.branch_id == branch_id:
            from deltabox.host import network as net
            net.detach_nat(rec.id)
        for m in linux.mounts_under(self.store.mnt_dir / branch_id):
            try:
                linux.umount(m)
            except OSError:
                linux.umount(m, linux.MNT_DETACH)

    def _retire_branch(self, branch_id: str, init_pid: int) -> None:
        """Tear down a branch that no record refers to any more, and delete it."""
        self._kill_incarnation(branch_id, init_pid)
        self.store.delete_branch_dirs(branch_id)

    # ---- lifecycle -------------------------------------------------------------------

    async def create(self, image: str, name: str = "", memory_bytes: int = 0, pids: int = 0,
                     cpus: float = 0.0, network: str = "none", env: dict | None = None,
                     hostname: str = "", disk_bytes: int = 0,
                     disk_inodes: int = 0) -> SandboxRecord:
        _check_limits(memory_bytes, pids, cpus, disk_bytes, disk_inodes)
        if network not in ("none", "nat"):
            raise InvalidArgument(f"network must be 'none' or 'nat', not {network!r}")
        env = dict(env or {})
        _check_env(env)
        name = validate_name(name, "sandbox") if name else _auto_name()
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
        spec = dict(spec)
        async with self._create_lock:
            if spec["network"] == "nat":
                from deltabox.host import network as net
                used = {r.spec["net_index"] for r in self.store.list_sandboxes()
                        if "net_index" in r.spec}
                spec["net_index"] = net.allocate_index(used)
                spec["ip_address"] = net.addresses(spec["net_index"])[1]
            rec = await asyncio.to_thread(self.store.create_sandbox, name, image, spec,
                                          checkpoint_id)
        rt = _Runtime(0, rec.branch_id)
        try:
            rt.init_pid, start = await asyncio.to_thread(
                self._launch, rec, self.store.branch_mount(rec.branch_id), True, restore_from)
            crash_point("fork.launched" if checkpoint_id else "create.launched")
            if restore_from is not None and fork_index >= 0:
                await self._reseed(rt, fork_index)
            await asyncio.to_thread(self.store.set_sandbox_state, rec.id, "running",
                                    rt.init_pid, start)
        except BaseException:
            await asyncio.to_thread(self._kill_incarnation, rec.branch_id, rt.init_pid, rec)
            await asyncio.to_thread(self.store.delete_sandbox, rec.id)
            raise
        self._runtime[rec.id] = rt
        log.info("sandbox.created", sandbox=rec.id, name=name, image=image,
                 checkpoint=checkpoint_id or None)
        return self.store.get_sandbox(rec.id)

    async def destroy(self, ref: str) -> None:
        rec = self.get(ref)
        rt = self._runtime.get(rec.id)
        lock = rt.lock if rt else asyncio.Lock()
        async with lock:
            init_pid = rt.init_pid if rt else rec.init_pid
            # Marked first: a daemon killed half way through must not bring the sandbox
            # back at its next start (a 'broken' record is torn down there).
            await asyncio.to_thread(self.store.set_sandbox_state, rec.id, "broken")
            try:
                if rt is not None:
                    rt.closed = True  # a standby still being built retires itself
                    async with rt.standby_lock:
                        await self._drop_standby(rt)
                await asyncio.to_thread(self._kill_incarnation, rec.branch_id, init_pid, rec)
                crash_point("destroy.killed")
            except Exception as e:
                await asyncio.to_thread(self.store.set_sandbox_state, rec.id, "broken")
                raise Internal(f"destroying {rec.id} failed half way ({e}); it is marked broken, "
                               "destroy it again or restart the daemon") from e
            self._runtime.pop(rec.id, None)
            await asyncio.to_thread(self.store.delete_sandbox, rec.id)
        log.info("sandbox.destroyed", sandbox=rec.id)

    # ---- checkpoints (DeltaFS) ---------------------------------------------------------

    async def checkpoint(self, ref: str, label: str = "", mode: str = "fs",
                         wait_ready: bool = False) -> CheckpointRecord:
        """Checkpoint a sandbox; its body double (full) or standby (fs) is then built
        in the background -- or before returning, with `wait_ready` (see `ready`)."""
        if mode not in ("fs", "full"):
            raise InvalidArgument(f"checkpoint mode must be 'fs' or 'full', not {mode!r}")
        if len(label) > 1024 or "\0" in label:
            raise InvalidArgument("label must be at most 1024 characters without NUL")
        rec, rt = self._running(ref)
        async with rt.lock:
            if mode == "full":
                self._require_criu()
                if rec.spec.get("network") == "nat":
                    raise FailedPrecondition("full checkpoints of NAT sandboxes are not supported "
                                             "yet (the veth to the host cannot be restored)")
                # Close the gate first: calls arriving from now on wait for the dump.
                rt.gate.clear()
            try:
                if mode == "full":
                    if rt.active:
                        raise FailedPrecondition(
                            f"{rt.active} call(s) are running in sandbox {rec.name} (exec, "
                            "session code or shell); a full checkpoint needs them finished, "
                            "because their connections to the daemon cannot be restored. Idle "
                            "sessions are fine.")
                    await asyncio.to_thread(self._refuse_stopped, rec, rt.branch_id)
                    await _controls_done(rt, rec.name)
                    await rt.channel.barrier()
                ckpt = await asyncio.to_thread(self._checkpoint_blocking, rec.id, rt, label,
                                               mode)
            finally:
                rt.gate.set()
        self.metrics.checkpoints.labels(mode).inc()
        self.metrics.frozen.labels(mode).observe(ckpt.stats["frozen_ms"] / 1000)
        self.metrics.image_bytes.inc(ckpt.stats.get("image_bytes", 0))
        log.info("checkpoint.created", sandbox=rec.id, checkpoint=ckpt.id,
                 layers=len(ckpt.layers), **ckpt.stats)
        standby = self._spawn_background(self._prepare_standby(rec.id, ckpt.id))
        self._spawn_background(self._maybe_squash(ckpt.id))
        if mode == "full":
            self._spawn_background(self._dedupe_images(ckpt))
        if wait_ready:
            await asyncio.shield(standby)  # a cancelled call leaves the build running
            with contextlib.suppress(NotFound):  # the build may have marked it unusable
                fresh = self.store.get_checkpoint(ckpt.id)
                ckpt = dataclasses.replace(ckpt, unusable_reason=fresh.unusable_reason,
                                           unusable_criu=fresh.unusable_criu)
        return ckpt

    def ready(self, checkpoint_id: str) -> bool:
        """Whether a body double (full) or standby (fs) of the checkpoint is built and
        waiting: a rollback to it now takes the "double" / "standby" path."""
        return any(rt.standby is not None and rt.standby.checkpoint_id == checkpoint_id
                   for rt in self._runtime.values())

    async def _dedupe_images(self, ckpt: CheckpointRecord) -> None:
        """Share the pages a full checkpoint has in common with its parent's dump."""
        try:
            parent = self.store.get_checkpoint(ckpt.parent_id) if ckpt.parent_id else None
        except NotFound:
            return
        if parent is None or parent.mode != "full":
            return
        from deltabox.host.criu import dedupe_pages
        shared = await asyncio.to_thread(dedupe_pages, self.store.images_path(parent.id),
                                         self.store.images_path(ckpt.id))
        await asyncio.to_thread(self.store.update_stats, ckpt.id, {"shared_bytes": shared})
        log.info("checkpoint.images_deduplicated", checkpoint=ckpt.id, shared_bytes=shared)

    def _checkpoint_blocking(self, sandbox_id: str, rt: _Runtime, label: str,
                             mode: str) -> CheckpointRecord:
        """Sink (and dump), then record, in one worker thread (one hop off the loop)."""
        rec = self.store.get_sandbox(sandbox_id)
        t0 = time.perf_counter()
        images = self.store.new_tmp_dir() if mode == "full" else None
        try:
            tmp, manifest, stats, frozen_ms = self._sink(rec, rt, images)
        except BaseException:
            if images is not None:
                _rmtree_quiet(images)
            raise
        t1 = time.perf_counter()
        lower = self.store.get_branch(rec.branch_id).lower
        base = lower + tuple(rt.own_layers)
        # What to mount: the head's chain (squashed, once it is) plus the new layer.
        base_mount = self._shortest_mount(rec.head) if rec.head and rt.own_layers else lower
        try:
            ckpt = self.store.commit_checkpoint(
                rec, label, mode, base, base_mount, tmp,
                {"changed": stats.changed, "whiteouts": stats.whiteouts,
                 "cloned_bytes": stats.cloned_bytes, **stats.phases_ms}, images)
        except BaseException:
            for d in (tmp, images):
                if d is not None:
                    _rmtree_quiet(d)
            raise
        crash_point("checkpoint.committed")
        t2 = time.perf_counter()
        if tmp is not None:
            rt.own_layers.append(ckpt.layers[-1])
        rt.manifest = manifest
        ckpt.stats.update({"frozen_ms": frozen_ms, "sink_ms": 1000 * (t1 - t0),
                           "commit_ms": 1000 * (t2 - t1), "total_ms": 1000 * (t2 - t0)})
        return ckpt

    def _shortest_mount(self, checkpoint_id: str) -> tuple[str, ...]:
        """The checkpoint's mount chain, rebased on its nearest squashed ancestor on
        the same lineage: checkpoints taken while a squash ran mount the squashed
        layer plus their newer layers as soon as it is there."""
        head = self.store.get_checkpoint(checkpoint_id)
        if len(head.mount_layers) <= self.config.max_chain_depth:
            return head.mount_layers
        anc = head
        while anc.parent_id:
            anc = self.store.get_checkpoint(anc.parent_id)
            if head.layers[:len(anc.layers)] != anc.layers:
                break  # another lineage (a rollback target's chain)
            if anc.squashed:
                return anc.mount_layers + head.layers[len(anc.layers):]
        return head.mount_layers

    def _sink(self, rec: SandboxRecord, rt: _Runtime, images: Path | None = None):
        """Freeze, sink the upper's changes into a new tmp layer dir, (dump the
        processes into `images`: the same frozen instant), thaw.

        Returns (tmp dir or None if nothing changed, new manifest, stats, ms frozen)."""
        upper = self.store.branches_dir / rec.branch_id / "upper"
        manifest = rt.manifest or deltafs.Manifest()
        tmp = self.store.new_tmp_dir()
        t0 = time.perf_counter()
        self.cgroups.freeze(rec.branch_id)
        t1 = time.perf_counter()
        try:
            stats, new_manifest = deltafs.sink_upper_into_layer(upper, tmp, manifest)
            crash_point("checkpoint.sink")
            t_sink = time.perf_counter()
            if images is not None:
                dump = self._require_criu().dump(
                    rt.init_pid, images, self.store.mnt_dir / rec.branch_id,
                    self.cgroups.freezer_path(rec.branch_id))
                stats.phases_ms["dump_ms"] = dump.ms
                stats.phases_ms["sink_fs_ms"] = 1000 * (t_sink - t1)
                stats.phases_ms["image_bytes"] = dump.image_bytes
        except BaseException:
            self.cgroups.thaw(rec.branch_id)
            _rmtree_quiet(tmp)
            raise
        t2 = time.perf_counter()
        self.cgroups.thaw(rec.branch_id)
        t3 = time.perf_counter()
        frozen_ms = 1000 * (t3 - t0)
        stats.phases_ms.update({"freeze_ms": 1000 * (t1 - t0), "copy_ms": 1000 * (t2 - t1),
                                "thaw_ms": 1000 * (t3 - t2)})
        if stats.changed == 0 and stats.whiteouts == 0:
            _rmtree_quiet(tmp)
            tmp = None
        return tmp, new_manifest, stats, frozen_ms

    def _check_in_tree(self, rec: SandboxRecord, ckpt: CheckpointRecord) -> None:
        if ckpt.sandbox_id == rec.id:
            return
        if rec.head and self.store.tree_root(rec.head) == self.store.tree_root(ckpt.id):
            return
        raise FailedPrecondition(f"checkpoint {ckpt.id} is not in the tree of sandbox "
                                 f"{rec.name}; fork it instead")

    async def rollback(self, ref: str, checkpoint_id: str) -> tuple[SandboxRecord, str, dict]:
        """Roll the sandbox back to a checkpoint: (record, path taken, timings in ms).

        Restore first, then switch: the new incarnation (a ready body double or
        standby, else a CRIU restore or a fresh init next to the old tree) is up
        before anything of the old one is touched; then the records switch in one
        transaction and the old tree is killed. A rollback that fails leaves the
        sandbox exactly as it was (same processes, files, state).

        Paths: "double" / "standby" (a ready one was swapped in), "double-waited" /
        "standby-waited" (it was still being built: the rollback waited for it,
        timings["wait_ms"]), "restore" / "fresh" (none was ready). It runs to its end
        even if the caller goes away (what it builds must not be left unowned); the
        checkpoint is held meanwhile, so a deletion of it waits."""
        async def held():
            async with self._holds.hold(checkpoint_id):
                return await self._rollback(ref, checkpoint_id)
        task = self._spawn_background(held())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a caller gone
        return await asyncio.shield(task)

    async def _rollback(self, ref: str, checkpoint_id: str) -> tuple[SandboxRecord, str, dict]:
        ckpt = self.store.get_checkpoint(checkpoint_id)
        rec = self.get(ref)
        self._check_in_tree(rec, ckpt)
        self._refuse_unusable(ckpt)
        rt = self._runtime.get(rec.id)
        if rt is None:
            raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}, not running")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        async with rt.lock:
            rec = self.store.get_sandbox(rec.id)
            if rt.closed or self._runtime.get(rec.id) is not rt or rec.state != "running":
                raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}, not running")
            waited = False
            if rt.standby_lock.locked() and rt.standby_target == ckpt.id \
                    and (rt.standby is None or rt.standby.checkpoint_id != ckpt.id):
                t_wait = time.perf_counter()
                async with rt.standby_lock:  # almost ready: cheaper than a fresh start
                    pass
                waited = True
                timings["wait_ms"] = 1000 * (time.perf_counter() - t_wait)
            old_branch, old_pid = rt.branch_id, rt.init_pid
            standby = rt.standby if rt.standby and rt.standby.checkpoint_id == ckpt.id else None
            if standby is None and ckpt.mode == "full":  # its double may have failed meanwhile
                self._refuse_unusable(self.store.get_checkpoint(ckpt.id))
            if standby is not None:
                rt.standby = None
                path = ("double" if ckpt.mode == "full" else "standby") + \
                    ("-waited" if waited else "")
                new_branch, pid, start = standby.branch_id, standby.init_pid, standby.init_start
            else:
                path = "restore" if ckpt.mode == "full" else "fresh"
                new_branch, pid = new_id("br"), 0
                await asyncio.to_thread(self.store.new_branch_dirs, new_branch, ckpt.mount_layers,
                                        rec.spec)
                try:
                    # Next to the old tree: its own branch, cgroup and namespaces. The
                    # network is attached once the old tree is gone (one veth name).
                    pid, start = await asyncio.to_thread(
                        self._launch, rec, self.store.branch_mount_for(new_branch,
                                                                       ckpt.mount_layers),
                        False, self._images_for(ckpt))
                except BaseException as e:
                    await asyncio.to_thread(self._retire_branch, new_branch, 0)
                    if isinstance(e, CriuError):  # the checkpoint's fault? (in the background)
                        self._spawn_background(self._recheck_restore(rec, ckpt, e))
                    raise
            try:
                crash_point("rollback.before_switch")
                if standby is not None:  # one short transaction, no hop off the loop
                    self.store.switch_branch(rec, new_branch, ckpt.mount_layers, ckpt.id, pid,
                                             start)
                else:
                    await asyncio.to_thread(self.store.switch_branch, rec, new_branch,
                                            ckpt.mount_layers, ckpt.id, pid, start)
            except BaseException:
                await asyncio.to_thread(self._retire_branch, new_branch, pid)
                raise
            crash_point("rollback.after_switch")
            # SIGKILL to the old init ends its whole pid namespace; unmounting and
            # deleting its branch happen in the background.
            _kill_quiet(old_pid)
            if standby is not None and ckpt.mode == "full":
                self._resume(new_branch)  # the body double wakes up
            rt.init_pid, rt.branch_id = pid, new_branch
            rt.own_layers, rt.manifest = [], deltafs.Manifest()
            rt.session_locks.clear()
            if standby is None and rt.standby is not None:  # the old head's, now unused
                unused, rt.standby = rt.standby, None
                self._spawn_background(asyncio.to_thread(self._retire_branch, unused.branch_id,
                                                         unused.init_pid))
            if rec.spec.get("network") == "nat":
                await asyncio.to_thread(self._attach_network, rec, pid,
                                        self.store.mnt_dir / new_branch)
        timings["total_ms"] = 1000 * (time.perf_counter() - t0)
        self._spawn_background(asyncio.to_thread(self._retire_branch, old_branch, old_pid))
        self._spawn_background(self._prepare_standby(rec.id, ckpt.id))
        self.metrics.rollbacks.labels(path).inc()
        self.metrics.rollback_seconds.labels(path).observe(timings["total_ms"] / 1000)
        log.info("sandbox.rolled_back", sandbox=rec.id, checkpoint=ckpt.id, path=path,
                 **timings)
        return self.store.get_sandbox(rec.id), path, timings

    # A standby is the checkpoint's filesystem mounted on its own fresh branch with
    # an init already running on it (the filesystem-mode "body double"): rolling
    # back to that checkpoint then only swaps records and kills the old tree.

    async def _prepare_standby(self, sandbox_id: str, checkpoint_id: str) -> None:
        """Make the sandbox's standby an incarnation of `checkpoint_id` (its head).

        One build at a time per sandbox (rt.standby_lock); a request superseded by a
        newer one (rt.standby_target moved on), or for a sandbox destroyed meanwhile,
        builds nothing or retires what it built -- nothing is ever left unowned."""
        rt = self._runtime.get(sandbox_id)
        if rt is None or rt.closed or self._stopping or not self.config.standby:
            return
        rt.standby_target = checkpoint_id
        async with rt.standby_lock:
            if rt.closed or rt.standby_target != checkpoint_id:
                return
            if rt.standby is not None and rt.standby.checkpoint_id == checkpoint_id:
                return
            await self._drop_standby(rt)
            # A double will hold about what the sandbox holds now.
            need = self.cgroups.memory_usage(rt.branch_id)
            if self._pool_bytes() + need > self.config.warm_budget_bytes:
                await self._evict_pools(keep="")
                if self._pool_bytes() + need > self.config.warm_budget_bytes:
                    # Over the memory budget: no double; a rollback takes the
                    # restore path (and prepares one again if there is room then).
                    log.info("standby.skipped_over_budget", sandbox=sandbox_id,
                             budget=self.config.warm_budget_bytes)
                    return
            async with self._holds.hold(checkpoint_id):  # not deleted under the build
                standby = await self._build_standby(sandbox_id, checkpoint_id)
            if standby is None:
                return
            if rt.closed or rt.standby_target != checkpoint_id \
                    or self._runtime.get(sandbox_id) is not rt:
                await asyncio.to_thread(self._retire_branch, standby.branch_id,
                                        standby.init_pid)
                return
            rt.standby = standby

    async def _build_standby(self, sandbox_id: str, checkpoint_id: str) -> _Standby | None:
        try:
            rec = self.store.get_sandbox(sandbox_id)
            ckpt = self.store.get_checkpoint(checkpoint_id)
        except NotFound:
            return None
        return await self._build_double(rec, ckpt, "standby")

    async def _build_double(self, rec: SandboxRecord, ckpt: CheckpointRecord,
                            what: str, first: Exception | None = None) -> _Standby | None:
        """An incarnation of `ckpt` on a fresh branch, left frozen (a body double) for a
        full checkpoint; None if it could not be made (an optimisation only: the
        caller falls back to a restore).

        A full checkpoint whose double fails is tried once more; failing again the
        same way marks it unusable (see `_judge_double_failure`). `first`: a restore
        of it that failed already (one attempt is left). A success clears a mark left
        by another CRIU build."""
        if ckpt.mode == "full" and self._known_unusable(ckpt):
            return None
        for attempt in (1, 2)[1 if first is not None else 0:]:
            branch_id = new_id("br")
            await asyncio.to_thread(self.store.new_branch_dirs, branch_id, ckpt.mount_layers,
                                    rec.spec)
            mnt = self.store.branch_mount_for(branch_id, ckpt.mount_layers)
            try:
                # The network is attached when (if) the standby is promoted. A full
                # checkpoint's standby is its body double: restored, left frozen.
                pid, start = await asyncio.to_thread(self._launch, rec, mnt, False,
                                                     self._images_for(ckpt), True)
            except Exception as e:  # noqa: BLE001 - a standby is an optimisation only
                log.warning(f"{what}.failed", sandbox=rec.id or None, checkpoint=ckpt.id,
                            attempt=attempt, error=str(e))
                await asyncio.to_thread(self._retire_branch, branch_id, 0)
                if ckpt.mode != "full" or self._stopping or not _criu_own_failure(e):
                    return None
                if first is None:
                    first = e
                    continue
                await asyncio.to_thread(self._judge_double_failure, ckpt, first, e)
                return None
            if ckpt.unusable_reason:
                await asyncio.to_thread(self.store.set_unusable, ckpt.id, "")
                log.info("checkpoint.restorable_again", checkpoint=ckpt.id,
                         criu=self._criu_build())
            return _Standby(branch_id, ckpt.id, pid, start)
        return None

    # ---- checkpoints that cannot be restored ----------------------------------------
    #
    # A full checkpoint is acknowledged when its dump succeeded, but some process trees
    # dump and then never restore (a CRIU bug, e.g. CRIU issue #2687 before our patch
    # 0002). Building the body double is the first restore: when it fails twice the
    # same way, the checkpoint is marked unusable with CRIU's reason (store: unusable,
    # unusable_criu), shown in CheckpointInfo and the tree, and rollback, fork and warm
    # to it fail at once. The mark names the CRIU build: another build tries again.

    async def _recheck_restore(self, rec: SandboxRecord, ckpt: CheckpointRecord,
                               error: Exception) -> None:
        """A restore of `ckpt` failed outside a double (a rollback's or a fork's): one
        more, on a throwaway branch, tells whether the checkpoint is at fault."""
        if ckpt.mode != "full" or not _criu_own_failure(error) or self._stopping \
                or self._known_unusable(ckpt):
            return
        async with self._holds.hold(ckpt.id):
            try:
                ckpt = self.store.get_checkpoint(ckpt.id)
            except NotFound:
                return
            sb = await self._build_double(rec, ckpt, "recheck", first=error)
        if sb is not None:  # it restored this time: a transient failure
            await asyncio.to_thread(self._retire_branch, sb.branch_id, sb.init_pid)

    def _criu_build(self) -> str:
        return self.criu.build_id() if self.criu is not None else ""

    def _known_unusable(self, ckpt: CheckpointRecord) -> bool:
        return bool(ckpt.unusable_reason) and ckpt.unusable_criu == self._criu_build()

    def _refuse_unusable(self, ckpt: CheckpointRecord) -> None:
        """Fail fast, with the reason, instead of a restore that is known to fail."""
        if self._known_unusable(ckpt):
            raise FailedPrecondition(
                f"checkpoint {ckpt.id} cannot be restored: its processes failed to restore "
                f"twice the same way ({ckpt.unusable_reason}); roll back to another "
                "checkpoint")

    def _judge_double_failure(self, ckpt: CheckpointRecord, first: Exception,
                              second: Exception) -> None:
        """Two restores of the images, on two fresh branches, failed. The same CRIU
        error lines both times (numbers aside: pids, fds) mean the images cannot be
        restored; different ones mean something transient (the host, not the
        checkpoint), which leaves the checkpoint unmarked."""
        a, b = (_comparable(getattr(e, "lines", str(e))) for e in (first, second))
        if a != b:
            log.info("checkpoint.double_failure_transient", checkpoint=ckpt.id,
                     first=str(first), second=str(second))
            return
        reason = getattr(second, "lines", str(second))
        self.store.set_unusable(ckpt.id, reason, self._criu_build())
        log.error("checkpoint.unusable", checkpoint=ckpt.id, sandbox=ckpt.sandbox_id,
                  reason=reason, criu=self._criu_build())

    async def _reseed(self, rt: _Runtime, index: int) -> None:
        """Clones of one process state share RNG state: tell each child its index
        (/.deltabox/fork-index) and re-seed Python sessions' `random` from os.urandom."""
        await asyncio.to_thread(
            SandboxFiles(self.store.mnt_dir / rt.branch_id, 1 << 20).write,
            "/.deltabox/fork-index", f"{index}\n".encode())
        for key in (await rt.channel.list_sessions()):
            kind, _, name = key.partition("/")
            if kind == "python":
                await self._run_locked(rt, kind, name, "__import__('random').seed()", 10.0)

    async def _drop_standby(self, rt: _Runtime) -> None:
        standby, rt.standby = rt.standby, None
        if standby is not None:
            await asyncio.to_thread(self._retire_branch, standby.branch_id, standby.init_pid)

    # ---- fork, and warm pools for it -------------------------------------------------

    def _child_spec(self, ckpt: CheckpointRecord) -> dict:
        return {k: v for k, v in ckpt.spec.items() if k not in ("net_index", "ip_address")}

    async def warm(self, checkpoint_id: str, n: int, wait: bool = False) -> int:
        """Prepare up to n incarnations of a checkpoint for a coming fork (body doubles
        for full checkpoints, inits on ready branches for fs ones). Returns how many
        are ready (after preparing them, if `wait`)."""
        if not isinstance(n, int) or not 0 <= n <= self.config.max_fork:
            raise InvalidArgument(f"n must be between 0 and {self.config.max_fork}")
        ckpt = self.store.get_checkpoint(checkpoint_id)
        self._refuse_unusable(ckpt)
        if ckpt.spec.get("network") == "nat":
            raise FailedPrecondition("warm forks of NAT sandboxes are not supported yet")
        pool = self._pools.setdefault(ckpt.id, [])
        self._pool_used[ckpt.id] = time.monotonic()
        missing = max(0, n - len(pool))
        jobs = [self._warm_one(ckpt) for _ in range(missing)]
        if wait:
            await asyncio.gather(*jobs, return_exceptions=True)
        else:
            for job in jobs:
                self._spawn_background(job)
        return len(self._pools.get(ckpt.id, []))

    async def _warm_one(self, ckpt: CheckpointRecord) -> None:
        if self._stopping:
            return
        async with self._warm_sem, self._holds.hold(ckpt.id):
            if not self.store.checkpoint_exists(ckpt.id):  # deleted before the hold
                return
            # A double holds about its images' pages (an fs incarnation: ~nothing).
            need = int(ckpt.stats.get("image_bytes", 0))
            if self._pool_bytes() + need > self.config.warm_budget_bytes:
                await self._evict_pools(keep=ckpt.id)
                if self._pool_bytes() + need > self.config.warm_budget_bytes:
                    log.info("warm.skipped_over_budget", checkpoint=ckpt.id,
                             budget=self.config.warm_budget_bytes)
                    return
            shell = SandboxRecord("", "", ckpt.image, "", "", 0.0, self._child_spec(ckpt))
            sb = await self._build_double(shell, ckpt, "warm")
            if sb is None:
                return
        if ckpt.id not in self._pools or self._stopping:  # dropped meanwhile
            await asyncio.to_thread(self._retire_branch, sb.branch_id, sb.init_pid)
            return
        self._pools[ckpt.id].append(sb)

    def _pool_bytes(self) -> int:
        """Memory held by prepared incarnations: warm pools and sandboxes' standbys."""
        total = 0
        for pool in self._pools.values():
            for sb in pool:
                total += self.cgroups.memory_usage(sb.branch_id)
        for rt in self._runtime.values():
            if rt.standby is not None:
                total += self.cgroups.memory_usage(rt.standby.branch_id)
        return total

    async def _evict_pools(self, keep: str) -> None:
        """Drop whole pools, least recently used first, until under the budget.
        Pinned checkpoints keep theirs; an evicted checkpoint stays restorable
        (its images are on the store): only the head start is lost."""
        for cid in sorted(self._pools, key=lambda c: self._pool_used.get(c, 0)):
            if self._pool_bytes() <= self.config.warm_budget_bytes:
                return
            if cid == keep:
                continue
            try:
                if self.store.get_checkpoint(cid).pinned:
                    continue
            except NotFound:
                pass
            await self._drop_pool(cid)
            log.info("warm.evicted", checkpoint=cid)

    async def _drop_pool(self, checkpoint_id: str) -> None:
        for sb in self._pools.pop(checkpoint_id, []):
            await asyncio.to_thread(self._retire_branch, sb.branch_id, sb.init_pid)

    async def fork(self, checkpoint_id: str, n: int) -> list[SandboxRecord | Exception]:
        """n new sandboxes from a checkpoint (see `_fork`); a deletion of the checkpoint
        waits until they are up."""
        async with self._holds.hold(checkpoint_id):
            return await self._fork(checkpoint_id, n)

    async def _fork(self, checkpoint_id: str, n: int) -> list[SandboxRecord | Exception]:
        """n new sandboxes from a checkpoint; one result (record or error) per child.

        Warm incarnations (see `warm`) are adopted first, the rest start cold
        (a fresh init, or a CRIU restore for a full checkpoint)."""
        if not isinstance(n, int) or not 1 <= n <= self.config.max_fork:
            raise InvalidArgument(f"n must be between 1 and {self.config.max_fork}")
        ckpt = self.store.get_checkpoint(checkpoint_id)
        self._refuse_unusable(ckpt)
        spec = self._child_spec(ckpt)
        pool = self._pools.get(ckpt.id, [])
        self._pool_used[ckpt.id] = time.monotonic()
        warm = [pool.pop() for _ in range(min(n, len(pool)))]

        async def cold(i: int) -> SandboxRecord:
            name = _auto_name()
            child = dict(spec, env={**spec.get("env", {}), "DELTABOX_FORK_INDEX": str(i)})
            return await self._create_from(ckpt.image, name, child, ckpt.id,
                                           self._images_for(ckpt), i)

        async def adopt(i: int, sb: _Standby) -> SandboxRecord:
            name = _auto_name()
            child = dict(spec, env={**spec.get("env", {}), "DELTABOX_FORK_INDEX": str(i)})
            rec = await asyncio.to_thread(self.store.adopt_sandbox, name, ckpt.image, child,
                                          ckpt.id, sb.branch_id, ckpt.mount_layers,
                                          sb.init_pid, sb.init_start)
            rt = _Runtime(sb.init_pid, sb.branch_id)
            self._runtime[rec.id] = rt
            crash_point("fork.adopted")
            if ckpt.mode == "full":
                self._resume(sb.branch_id)
                await self._reseed(rt, i)
            return rec
        jobs = [adopt(i, sb) for i, sb in enumerate(warm)]
        jobs += [cold(i) for i in range(len(warm), n)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        failed = next((r for r in results if isinstance(r, CriuError)), None)
        if failed is not None:  # the checkpoint's fault? (in the background)
            shell = SandboxRecord("", "", ckpt.image, "", "", 0.0, spec)
            self._spawn_background(self._recheck_restore(shell, ckpt, failed))
        self.metrics.forked.labels("warm").inc(len(warm))
        self.metrics.forked.labels("cold").inc(n - len(warm))
        log.info("checkpoint.forked", checkpoint=ckpt.id, n=n, warm=len(warm),
                 failed=sum(isinstance(r, Exception) for r in results))
        return list(results)  # type: ignore[arg-type]

    def list_checkpoints(self, ref: str) -> list[CheckpointRecord]:
        return self.store.checkpoint_tree(self.get(ref))

    def _chain_for(self, ref: str) -> list[Path]:
        """Layer dirs of a checkpoint, or of a live sandbox (its lower + its upper).

        Only these roots are host paths (the daemon's own directories); everything
        below them is the sandbox's, and deltafs reaches it fd-relative only."""
        try:
            ckpt = self.store.get_checkpoint(ref)
            return [self.store.layer_path(lid) for lid in ckpt.mount_layers]
        except NotFound:
            pass
        try:
            rec = self.get(ref)
        except NotFound:
            raise NotFound(f"{ref!r} is neither a checkpoint nor a sandbox") from None
        lower = self.store.get_branch(rec.branch_id).lower
        return [self.store.layer_path(lid) for lid in lower] + [
            self.store.branches_dir / rec.branch_id / "upper"]

    async def diff(self, a: str, b: str) -> list[tuple[str, str]]:
        if not a or not b:
            raise InvalidArgument("diff needs two checkpoints (or sandboxes)")
        chain_a, chain_b = self._chain_for(a), self._chain_for(b)
        # A live sandbox's upper is read while its processes run, not frozen: a diff
        # can take long and would stop the agent for all of it. Safe because deltafs
        # resolves every path below a tree's fd without following symlinks, so a
        # directory swapped for a symlink to / is seen as a change, never walked.
        return await asyncio.to_thread(deltafs.diff_chains, chain_a, chain_b)

    async def delete_checkpoint(self, checkpoint_id: str, cascade: bool) -> list[str]:
        """Delete a checkpoint (with cascade, its subtree). Ordered after the rollbacks,
        forks and double builds in flight on any of them: it waits for them (then,
        e.g., refuses the checkpoint a rollback just made a sandbox's head)."""
        self.store.get_checkpoint(checkpoint_id)
        while True:
            try:
                deleted = await asyncio.to_thread(self.store.delete_checkpoint, checkpoint_id,
                                                  cascade, self._holds.busy, False)
                break
            except CheckpointInUse as e:
                await self._holds.wait_released(e.checkpoint_ids, DELETE_WAIT_S)
        for cid in deleted:  # standbys and warm pools sit on them: gone before their files
            await self._drop_pool(cid)
            for rt in self._runtime.values():
                if rt.standby is not None and rt.standby.checkpoint_id == cid:
                    await self._drop_standby(rt)
        await asyncio.to_thread(self.store.remove_checkpoint_files, deleted)
        return deleted

    def pin_checkpoint(self, checkpoint_id: str, pinned: bool) -> CheckpointRecord:
        return self.store.set_pinned(checkpoint_id, pinned)

    async def _maybe_squash(self, checkpoint_id: str) -> None:
        """Squash a deep chain into one layer (reflinks) so lookups stay flat."""
        try:
            ckpt = self.store.get_checkpoint(checkpoint_id)
        except NotFound:
            return
        if len(ckpt.mount_layers) <= self.config.max_chain_depth or ckpt.squashed:
            return
        if self._squash_lock.locked():
            return  # coalesce: the next checkpoint retries if its chain is still deep
        async with self._squash_lock:
            tmp = self.store.new_tmp_dir()
            try:
                mount = ckpt.mount_layers
                # Keep the image's layers and squash what the sandbox added above
                # them (a delta squash: cost follows the changes, not the image).
                try:
                    image = self.store.get_image(ckpt.image).layer_ids
                except NotFound:
                    image = ()
                base = image if mount[:len(image)] == image and image else ()
                chain = [self.store.layer_path(lid) for lid in mount[len(base):]]
                squash = deltafs.squash_deltas if base else deltafs.squash_chain
                t0 = time.perf_counter()
                n = await asyncio.to_thread(squash, chain, tmp / "layer")
                await asyncio.to_thread(self.store.set_squashed, checkpoint_id, base,
                                        tmp / "layer", mount)
                # Checkpoints taken while it ran extend it: rebase them on it.
                await asyncio.to_thread(self.store.rebase_on_squashed, checkpoint_id)
                log.info("checkpoint.squashed", checkpoint=checkpoint_id, depth=len(mount),
                         kept=len(base), entries=n,
                         ms=round(1000 * (time.perf_counter() - t0), 1))
            except NotFound:
                pass
            finally:
                await asyncio.to_thread(_rmtree_quiet, tmp)
            await asyncio.to_thread(self.store.gc_layers)

    def get(self, ref: str) -> SandboxRecord:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument("sandbox id or name is required")
        return self.store.get_sandbox(ref)

    def list(self) -> list[SandboxRecord]:
        return self.store.list_sandboxes()

    def _running(self, ref: str) -> tuple[SandboxRecord, _Runtime]:
        rec = self.get(ref)
        rt = self._runtime.get(rec.id)
        if rec.state != "running" or rt is None:
            raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}, not running")
        return rec, rt

    def files(self, ref: str) -> SandboxFiles:
        rec = self.get(ref)
        root = self.store.mnt_dir / rec.branch_id
        if not linux.is_mountpoint(root):
            raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}: its files are not "
                                     "mounted")
        return SandboxFiles(root, self.config.max_file_read_bytes)

    def _env(self, rec: SandboxRecord, extra: dict | None) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm", "LANG": "C.UTF-8",
               "HOSTNAME": rec.spec["hostname"]}
        env.update(rec.spec.get("env", {}))
        if extra:
            _check_env(extra)
            env.update(extra)
        return env

    # ---- exec ------------------------------------------------------------------------

    async def exec(self, ref: str, argv: list[str], env: dict | None = None, cwd: str = "/",
                   stdin: bytes = b"", timeout: float = 0.0,
                   max_output: int = 0) -> AsyncIterator[ExecEvent]:
        """Run argv in the sandbox; yields started, stdout/stderr chunks, then exit."""
        if not argv or not argv[0]:
            raise InvalidArgument("argv must not be empty")
        if timeout < 0 or max_output < 0:
            raise InvalidArgument("timeout and max_output_bytes must be >= 0")
        rec, rt = self._running(ref)
        max_output = max_output or self.config.max_output_bytes
        async with rt.busy():
            async for ev in self._exec_conversation(rt, rec, argv, env, cwd, stdin, timeout,
                                                    max_output):
                yield ev

    async def _exec_conversation(self, rt: _Runtime, rec: SandboxRecord, argv: list[str],
                                 env: dict | None, cwd: str, stdin: bytes, timeout: float,
                                 max_output: int) -> AsyncIterator[ExecEvent]:
        conv, pid = await rt.channel.spawn(argv, self._env(rec, env), cwd or "/")
        started = time.monotonic()
        async with conv:
            yield ExecEvent("started", pid=pid)
            feeder = asyncio.create_task(_feed_stdin(conv, stdin))
            timed_out = False
            timer = None
            if timeout:
                async def expire() -> None:
                    nonlocal timed_out
                    await asyncio.sleep(timeout)
                    timed_out = True
                    await conv.send_signal(signal.SIGKILL)
                timer = asyncio.create_task(expire())
            sizes = {"stdout": 0, "stderr": 0}
            truncated = {"stdout": False, "stderr": False}
            try:
                async for frame in conv.frames():
                    if frame.type in (initproto.STDOUT, initproto.STDERR):
                        stream = "stdout" if frame.type == initproto.STDOUT else "stderr"
                        room = max_output - sizes[stream]
                        data = frame.payload[:room]
                        if len(data) < len(frame.payload):
                            truncated[stream] = True
                        if data:
                            sizes[stream] += len(data)
                            yield ExecEvent(stream, data=data)
                    elif frame.type == initproto.EXIT:
                        code, sig = _wait_status(int.from_bytes(frame.payload[:4], "little",
                                                                signed=True))
                        yield ExecEvent("exit", exit_code=code, signal=sig, timed_out=timed_out,
                                        stdout_truncated=truncated["stdout"],
                                        stderr_truncated=truncated["stderr"],
                                        duration=time.monotonic() - started)
                        return
                    elif frame.type == initproto.FAIL:
                        raise initproto.error_from_fail(frame.payload.decode(errors="replace"))
                raise Internal("the sandbox's init closed the connection before the process "
                               "exited (was the sandbox destroyed?)")
            finally:
                feeder.cancel()
                if timer:
                    timer.cancel()

    # ---- detached execs (kept processes) -------------------------------------------------
    # Started with exec(detach=True): the init owns them (a session-like record that
    # outlives the process), so they survive the call, the daemon's restart and full
    # checkpoints. No connection stays open for them: they never hold up a checkpoint.

    async def exec_detached(self, ref: str, argv: list[str], env: dict | None = None,
                            cwd: str = "/", stdin: bytes = b"") -> ProcessInfo:
        """Start argv and return at once with its handle; stdin is written, then closed."""
        if not argv or not argv[0]:
            raise InvalidArgument("argv must not be empty")
        if len(stdin) > MAX_DETACHED_STDIN:
            raise InvalidArgument(f"a detached exec takes at most {MAX_DETACHED_STDIN} bytes "
                                  "of stdin")
        rec, rt = self._running(ref)
        process_id = "p-" + secrets.token_hex(5)
        async with rt.control():
            conv, pid = await rt.channel.spawn(argv, self._env(rec, env), cwd or "/",
                                               session=PROCESS_PREFIX + process_id, keep=True)
            async with conv:  # closing detaches it; init takes the input first
                await _feed_stdin(conv, stdin)
        log.info("exec.detached", sandbox=rec.id, process=process_id, pid=pid)
        return ProcessInfo(process_id, pid, " ".join(argv)[:255], True)

    async def _query_process(self, ref: str, process_id: str, signal_number: int = 0,
                             output: bool = False) -> initproto.ProcessState:
        validate_name(process_id, "process")
        rec, rt = self._running(ref)
        async with rt.control():
            try:
                return await rt.channel.query(PROCESS_PREFIX + process_id, signal_number,
                                              output)
            except NotFound:
                raise ProcessNotFound(f"no process {process_id!r} in sandbox {rec.name}") from None

    async def list_processes(self, ref: str) -> list[ProcessInfo]:
        """Detached execs, running or ended (init remembers the 32 that ended last)."""
        rec, rt = self._running(ref)
        async with rt.control():
            names = [n for n in await rt.channel.list_sessions() if n.startswith(PROCESS_PREFIX)]
        out = []
        for name in reversed(names):  # init lists the newest first
            try:
                st = await self._query_process(ref, name[len(PROCESS_PREFIX):])
            except NotFound:  # forgotten in between
                continue
            out.append(ProcessInfo.from_state(name[len(PROCESS_PREFIX):], st))
        return out

    async def get_process(self, ref: str, process_id: str) -> ProcessInfo:
        return ProcessInfo.from_state(process_id, await self._query_process(ref, process_id))

    async def signal_process(self, ref: str, process_id: str, sig: int) -> ProcessInfo:
        """Send `sig` to the process group of a running detached exec."""
        if not 1 <= sig <= 64:
            raise InvalidArgument(f"signal must be 1-64, not {sig}")
        st = await self._query_process(ref, process_id, sig)
        if st.status is not None:
            raise FailedPrecondition(f"process {process_id} has ended")
        return ProcessInfo.from_state(process_id, st)

    async def wait_process(self, ref: str, process_id: str, timeout: float = 0.0) -> ProcessInfo:
        """Wait until the detached exec ends. It polls (no connection stays open, so a
        checkpoint may run meanwhile); DeadlineExceeded after `timeout` (0 = none)."""
        if timeout < 0:
            raise InvalidArgument("timeout must be >= 0")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        delay = 0.005
        while True:
            st = await self._query_process(ref, process_id)
            if st.status is not None:
                return ProcessInfo.from_state(process_id, st)
            left = deadline - loop.time() if deadline is not None else delay
            if left <= 0:
                raise DeadlineExceeded(f"process {process_id} still runs after {timeout}s")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.2)

    async def process_logs(self, ref: str, process_id: str,
                           follow: bool = False) -> AsyncIterator[ExecEvent]:
        """The kept output of a detached exec (stdout, then stderr: their interleaving is
        not kept), then `exit` if it has ended. `follow`: attach, relay live output and
        end with its exit -- an attached call, like exec (one follower at a time)."""
        if not follow:
            st = await self._query_process(ref, process_id, output=True)
            if st.stdout:
                yield ExecEvent("stdout", data=st.stdout, pid=st.pid)
            if st.stderr:
                yield ExecEvent("stderr", data=st.stderr, pid=st.pid)
            if st.status is not None:
                yield _process_exit(st, len(st.stdout), len(st.stderr))
            return
        validate_name(process_id, "process")
        rec, rt = self._running(ref)
        sizes = {initproto.STDOUT: 0, initproto.STDERR: 0}
        async with rt.busy():
            try:
                conv, _ = await rt.channel.attach(PROCESS_PREFIX + process_id)
            except NotFound:
                raise ProcessNotFound(f"no process {process_id!r} in sandbox {rec.name}") from None
            except FailedPrecondition:
                raise FailedPrecondition(f"process {process_id} is followed by another "
                                         "call") from None
            async with conv:
                async for frame in conv.frames():
                    if frame.type in sizes:
                        sizes[frame.type] += len(frame.payload)
                        yield ExecEvent("stdout" if frame.type == initproto.STDOUT
                                        else "stderr", data=frame.payload)
                    elif frame.type == initproto.EXIT:
                        break
                else:
                    raise Internal("the sandbox's init closed the connection before the "
                                   "process ended (was the sandbox destroyed?)")
        st = await self._query_process(ref, process_id)
        yield _process_exit(st, sizes[initproto.STDOUT], sizes[initproto.STDERR])

    # ---- sessions --------------------------------------------------------------------

    async def open_session(self, ref: str, kind: str = "bash", name: str = "",
                           env: dict | None = None, cwd: str = "/") -> tuple[str, int]:
        if kind not in SESSION_KINDS:
            raise InvalidArgument(f"session kind must be one of {SESSION_KINDS}")
        name = validate_name(name, "session") if name else f"{kind}-{secrets.token_hex(3)}"
        rec, rt = self._running(ref)
        # Ordered with rollbacks (and checkpoints): a session opened while a rollback
        # swaps incarnations would start in the old one, be acknowledged, then die
        # with it.
        async with rt.lock:
            if rt.closed or self._runtime.get(rec.id) is not rt:
                raise FailedPrecondition(f"sandbox {rec.name} is not running")
            existing = await self._sessions(rt)
            if name in existing:
                raise FailedPrecondition(f"session {name!r} exists in {rec.name}")
            argv = {"bash": ["bash", "--noprofile", "--norc"], "sh": ["sh"],
                    "python": ["python3", "-u", "-c", _PYTHON_DRIVER]}[kind]
            conv, pid = await rt.channel.spawn(argv, self._env(rec, env), cwd or "/",
                                               session=f"{kind}/{name}")
            async with conv:
                if kind != "python":
                    # A trap (unlike SIG_IGN) is reset on exec: SIGINT still stops the
                    # running command, while the shell itself survives to report.
                    await conv.send(initproto.STDIN, b"trap ':' INT\n")
        log.info("session.opened", sandbox=rec.id, session=name, kind=kind, pid=pid)
        return name, pid

    async def _sessions(self, rt: _Runtime) -> dict[str, tuple[str, int]]:
        """name -> (kind, pid) of live sessions, as init reports them."""
        out = {}
        async with rt.control():
            listed = await rt.channel.list_sessions()
        for key, pid in listed.items():
            kind, _, name = key.partition("/")
            if kind in SESSION_KINDS:  # not a detached exec
                out[name] = (kind, pid)
        return out

    async def list_sessions(self, ref: str) -> list[tuple[str, str, int]]:
        rec, rt = self._running(ref)
        return [(name, kind, pid) for name, (kind, pid) in sorted((await self._sessions(rt))
                                                                  .items())]

    async def close_session(self, ref: str, name: str) -> None:
        rec, rt = self._running(ref)
        sessions = await self._sessions(rt)
        if name not in sessions:
            raise SessionNotFound(f"no session {name!r} in {rec.name}")
        conv, _ = await rt.channel.attach(f"{sessions[name][0]}/{name}")
        async with conv:
            await conv.send_signal(signal.SIGKILL)
            async for frame in conv.frames():
                if frame.type == initproto.EXIT:
                    break

    async def run_in_session(self, ref: str, name: str, code: str,
                             timeout: float = 0.0) -> SessionResult:
        rec, rt = self._running(ref)
        if timeout < 0:
            raise InvalidArgument("timeout must be >= 0")
        sessions = await self._sessions(rt)
        if name not in sessions:
            raise SessionNotFound(f"no session {name!r} in {rec.name}")
        kind = sessions[name][0]
        lock = rt.session_locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise FailedPrecondition(f"session {name!r} is busy with another call")
        async with lock:
            async with rt.busy():
                return await self._run_locked(rt, kind, name, code, timeout)

    async def _run_locked(self, rt: _Runtime, kind: str, name: str, code: str,
                          timeout: float) -> SessionResult:
        nonce = secrets.token_hex(8)
        if kind == "python":
            body = code.encode()
            payload = f"{nonce} {len(body)}\n".encode() + body
        else:
            if f"__DBX_{nonce}__" in code:
                raise InvalidArgument("code contains the session delimiter")
            # eval of a quoted here-doc: the code runs in the shell itself (so its
            # variables and cwd persist) and a syntax error cannot eat the sentinel.
            payload = (f"eval \"$(cat <<'__DBX_{nonce}__'\n{code}\n__DBX_{nonce}__\n)\"\n"
                       f"printf '\\036{nonce}:%d\\036' \"$?\"; printf '\\036{nonce}\\036' >&2\n"
                       ).encode()
        re_out = f"\x1e{nonce}:".encode()
        err_end = f"\x1e{nonce}\x1e".encode()
        out, err = bytearray(), bytearray()
        started = time.monotonic()
        conv, _ = await rt.channel.attach(f"{kind}/{name}")
        async with conv:
            await conv.send(initproto.STDIN, payload)

            async def collect() -> int:
                exit_code = None
                async for frame in conv.frames():
                    if frame.type == initproto.STDOUT:
                        out.extend(frame.payload)
                    elif frame.type == initproto.STDERR:
                        err.extend(frame.payload)
                    elif frame.type == initproto.EXIT:
                        code_, sig = _wait_status(int.from_bytes(frame.payload[:4], "little",
                                                                 signed=True))
                        raise FailedPrecondition(
                            f"session {name!r} ended (exit {code_}, signal {sig}) while running "
                            f"the code; stdout: {bytes(out[-500:])!r} stderr: "
                            f"{bytes(err[-500:])!r}")
                    if len(out) + len(err) > self.config.max_output_bytes:
                        raise ResourceExhausted(f"session {name!r} produced more than "
                                                f"{self.config.max_output_bytes} bytes")
                    i = out.find(re_out)
                    if i >= 0 and exit_code is None:
                        j = out.find(b"\x1e", i + len(re_out))
                        if j >= 0:
                            exit_code = int(out[i + len(re_out):j])
                            del out[i:j + 1]
                    if exit_code is not None and err.endswith(err_end):
                        del err[-len(err_end):]
                        return exit_code
                raise Internal(f"session {name!r}: connection to init lost")

            task = asyncio.ensure_future(collect())
            try:
                exit_code = await asyncio.wait_for(asyncio.shield(task), timeout or None)
            except asyncio.TimeoutError:
                await conv.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(task, 2.0)
                    state = "interrupted (SIGINT); the session lives on"
                except (asyncio.TimeoutError, Exception):
                    await conv.send_signal(signal.SIGKILL)
                    state = "killed: it did not stop on SIGINT"
                raise DeadlineExceeded(f"session {name!r}: code ran past {timeout}s and was "
                                       f"{state}")
            finally:
                task.cancel()
        return SessionResult(bytes(out), bytes(err), exit_code, time.monotonic() - started)

    # ---- interactive shell -------------------------------------------------------------

    async def shell(self, ref: str, argv: list[str], env: dict | None, rows: int, cols: int,
                    inputs: AsyncIterator[tuple[str, object]]) -> AsyncIterator[ExecEvent]:
        """A pty-backed process; `inputs` yields ('stdin', bytes) or ('resize', (r, c))."""
        rec, rt = self._running(ref)
        if not argv:
            argv = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -l; "
                    "else exec sh -l; fi"]
        async with rt.busy():
            async for ev in self._shell_conversation(rt, rec, argv, env, rows, cols, inputs):
                yield ev

    async def _shell_conversation(self, rt, rec, argv, env, rows, cols, inputs):
        conv, pid = await rt.channel.spawn(argv, self._env(rec, env), "/root", pty=True,
                                           rows=rows or 24, cols=cols or 80)
        started = time.monotonic()
        async with conv:
            async def pump() -> None:
                async for kind, value in inputs:
                    if kind == "stdin":
                        await conv.send(initproto.STDIN, value)  # type: ignore[arg-type]
                    elif kind == "resize":
                        await conv.send_winsize(*value)  # type: ignore[misc]
            pumper = asyncio.create_task(pump())
            try:
                async for frame in conv.frames():
                    if frame.type in (initproto.STDOUT, initproto.STDERR):
                        yield ExecEvent("stdout", data=frame.payload)
                    elif frame.type == initproto.EXIT:
                        code, sig = _wait_status(int.from_bytes(frame.payload[:4], "little",
                                                                signed=True))
                        yield ExecEvent("exit", exit_code=code, signal=sig,
                                        duration=time.monotonic() - started)
                        return
            finally:
                pumper.cancel()


def _open_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def _auto_name() -> str:
    return "s-" + secrets.token_hex(6)


def _rmtree_quiet(path: Path) -> None:
    try:
        _rmtree(path)
    except OSError as e:
        log.warning("cleanup.failed", path=str(path), error=str(e))


# errno names in CRIU's error lines that say the host ran short, not that the
# images are bad: such a failure never marks a checkpoint unusable.
_SHORTAGE = ("ENOSPC", "No space left", "ENOMEM", "Cannot allocate memory", "EAGAIN",
             "Resource temporarily unavailable", "EMFILE", "ENFILE", "Too many open files",
             "EDQUOT", "Disk quota exceeded")


def _criu_own_failure(e: Exception) -> bool:
    """A restore CRIU itself refused (not a timeout, not a shortage of memory, disk,
    pids or fds, not the daemon's own mount or cgroup work)."""
    return isinstance(e, CriuError) and not e.timed_out \
        and not any(s in f"{e} {e.lines}" for s in _SHORTAGE)


def _comparable(lines: str) -> str:
    """CRIU error lines with the numbers (pids, fds, ids) blanked out."""
    return re.sub(r"\d+", "N", lines)


def _kill_quiet(pid: int) -> None:
    """SIGKILL a sandbox's init: the kernel then kills its whole pid namespace."""
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _process_exit(st: initproto.ProcessState, stdout_seen: int, stderr_seen: int) -> ExecEvent:
    code, sig = _wait_status(st.status or 0)
    return ExecEvent("exit", pid=st.pid, exit_code=code, signal=sig,
                     stdout_truncated=st.stdout_bytes > stdout_seen,
                     stderr_truncated=st.stderr_bytes > stderr_seen)


async def _controls_done(rt: _Runtime, name: str, timeout: float = 10.0) -> None:
    """Before a dump: let short conversations (rt.control()) end; the gate is closed."""
    try:
        await asyncio.wait_for(rt.controls_idle.wait(), timeout)
    except asyncio.TimeoutError:
        raise FailedPrecondition(f"{rt.controls} short call(s) to sandbox {name}'s init did "
                                 f"not end within {timeout}s") from None


async def _feed_stdin(conv: initproto.Conversation, data: bytes) -> None:
    if data:
        await conv.send(initproto.STDIN, data)
    await conv.send(initproto.STDIN_EOF)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is our (subreaped) zombie
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Limits the kernel takes (pids.max: at most PID_MAX_LIMIT; a CFS quota: at least 1 ms
# per 100 ms period) and that leave a sandbox able to start (its init and a process).
MIN_MEMORY_BYTES = 16 << 20
MIN_PIDS, MAX_PIDS = 4, 1 << 22
MIN_CPUS = 0.01
MIN_DISK_BYTES, MIN_DISK_INODES = 16 << 20, 1024  # the init's copy of itself lives there


def _check_limits(memory_bytes: int, pids: int, cpus: float, disk_bytes: int,
                  disk_inodes: int) -> None:
    """Refuse limits the kernel would reject (or that leave no sandbox), naming the field
    and its bounds; 0 means the default everywhere."""
    ncpu = os.cpu_count() or 1
    if not (math.isfinite(cpus) and (cpus == 0 or MIN_CPUS <= cpus <= ncpu)):
        raise InvalidArgument(f"cpus limit must be between {MIN_CPUS} and {ncpu} (the host's "
                              f"CPUs), or 0 for no quota; not {cpus}")
    for name, value, low, high, unit in (
            ("memory", memory_bytes, MIN_MEMORY_BYTES, None, "16 MiB"),
            ("pids", pids, MIN_PIDS, MAX_PIDS, str(MIN_PIDS)),
            ("disk", disk_bytes, MIN_DISK_BYTES, None, "16 MiB"),
            ("disk_inodes", disk_inodes, MIN_DISK_INODES, None, str(MIN_DISK_INODES))):
        if value != 0 and (value < low or high is not None and value > high):
            bounds = f"between {unit} and {high:,}" if high else f"at least {unit}"
            raise InvalidArgument(f"{name} limit must be {bounds} (0 = the daemon's "
                                  f"default), not {value:,}")


def _check_env(env: dict) -> None:
    size = 0
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k or "\0" in str(v):
            raise InvalidArgument(f"invalid environment variable name {k!r}")
        size += len(k) + len(str(v))
    if size > MAX_ENV_BYTES:
        raise InvalidArgument("environment too large")


# Runs inside python sessions: reads "<nonce> <length>\n<code>" blocks from stdin,
# executes each in one persistent namespace, then prints the sentinels.
_PYTHON_DRIVER = r"""
import sys, traceback
g = {"__name__": "__main__", "__builtins__": __builtins__}
inp = sys.stdin.buffer
while True:
    try:
        header = inp.readline()
        if not header:
            break
        nonce, n = header.split()
        code = inp.read(int(n)).decode()
        rc = 0
        try:
            exec(compile(code, "<session>", "exec"), g)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush(); sys.stderr.flush()
    sys.stdout.write("\x1e%s:%d\x1e" % (nonce.decode(), rc)); sys.stdout.flush()
    sys.stderr.write("\x1e%s\x1e" % nonce.decode()); sys.stderr.flush()
"""
