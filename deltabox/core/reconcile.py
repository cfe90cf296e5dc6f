"""Start-up, watching and shutdown: the kernel's state brought in line with the database.

At start-up (`Reconciler.start`) CRIU helpers a killed daemon left are ended, mounts and
cgroups no record names are removed, half-created or half-destroyed sandboxes are torn
down, and each running sandbox is adopted (its init is the recorded (pid, start time); it
is thawed if a killed checkpoint or rollback left it frozen) or restarted on its branch.
While the daemon runs, a sandbox whose init died turns 'stopped'. At shutdown every
incarnation is killed and unmounted; records stay 'running', so the next start restarts
them (files kept, processes fresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from pathlib import Path

import structlog

from deltabox.core import deltafs
from deltabox.core.deltacr import Standbys
from deltabox.core.incarnation import Incarnations, alive, process_start, same_process
from deltabox.core.runtime import Runtime, SandboxContext
from deltabox.core.warm import WarmPools
from deltabox.faults import crash_point
from deltabox.errors import NotFound
from deltabox.host import linux
from deltabox.store.records import SandboxRecord
from deltabox.types import SandboxState

__all__ = ["Reconciler"]

log = structlog.get_logger("deltabox.core.reconcile")


class Reconciler:
    def __init__(self, ctx: SandboxContext, incarnations: Incarnations, standbys: Standbys,
                 pools: WarmPools) -> None:
        self._ctx = ctx
        self.store = ctx.store
        self.cgroups = ctx.cgroups
        self._incarnations = incarnations
        self._standbys = standbys
        self._pools = pools
        self._monitor: asyncio.Task | None = None

    async def start(self) -> dict:
        """Reconcile the kernel's state with the database; adopt or restart sandboxes."""
        report = await asyncio.to_thread(self._reconcile)
        self._monitor = asyncio.create_task(self._watch_inits())
        return report

    def _reconcile(self) -> dict:
        inc = self._incarnations
        report = {"adopted": 0, "restarted": 0, "failed": 0, "removed": 0, "stray_mounts": 0,
                  "stray_cgroups": 0, "thawed": 0, "orphaned_criu": 0}
        # First the CRIU helpers a killed daemon left running: a dump still writes
        # into tmp/ and holds its sandbox seized and frozen, a restore forks into a
        # stray cgroup. They are given a moment to finish (killing a dump midway
        # can leave its parasite in a process), then killed.
        if self._ctx.criu is not None:
            report["orphaned_criu"] = self._ctx.criu.end_orphans()
            self._ctx.criu.ensure_kdat_cache()  # before any dump: see Criu.ensure_kdat_cache
        records = {r.id: r for r in self.store.list_sandboxes()}
        branches = {r.branch_id for r in records.values()}
        # Anything not on a recorded branch (e.g. a standby of a crashed daemon) goes.
        for target in linux.mounts_under(self.store.mnt_dir):
            if target != str(self.store.mnt_dir) and Path(target).name not in branches:
                linux.umount(target, linux.MNT_DETACH)
                report["stray_mounts"] += 1
        for name in self.cgroups.names() - branches:
            try:
                self.cgroups.kill_and_remove(name)
                report["stray_cgroups"] += 1
            except (OSError, TimeoutError) as e:  # one bad stray must not stop start-up
                log.error("reconcile.stray_cgroup_failed", cgroup=name, error=str(e))
        for rec in records.values():
            if rec.state in (SandboxState.CREATING, SandboxState.BROKEN):
                inc.kill(rec.branch_id, rec.init_pid, rec)
                self.store.delete_sandbox(rec.id)
                report["removed"] += 1
            elif rec.state == SandboxState.RUNNING:
                rt = Runtime(rec.init_pid, rec.branch_id)
                if same_process(rec.init_pid, rec.init_start) \
                        and rec.init_pid in self.cgroups.pids(rec.branch_id) \
                        and self._thaw_adopted(rec, report):
                    report["adopted"] += 1
                    if rec.init_start >= 1e9:  # a wall-clock start: record it boot-relative
                        self.store.set_sandbox_state(rec.id, SandboxState.RUNNING,
                                                     rec.init_pid, process_start(rec.init_pid))
                else:
                    self.cgroups.kill_all(rec.branch_id)
                    try:
                        rt.init_pid, start = inc.launch(rec,
                                                        self.store.branch_mount(rec.branch_id))
                    except Exception as e:  # noqa: BLE001 - one sandbox must not stop the daemon
                        # Its tree may be what refuses (root inside can break its own
                        # launch): it stays recorded, stopped, files kept.
                        log.error("reconcile.restart_failed", sandbox=rec.id, error=str(e))
                        inc.kill(rec.branch_id, 0)
                        self.store.set_sandbox_state(rec.id, SandboxState.STOPPED)
                        report["failed"] += 1
                        continue
                    self.store.set_sandbox_state(rec.id, SandboxState.RUNNING, rt.init_pid,
                                                 start)
                    report["restarted"] += 1
                self._recover_manifest(rec, rt)
                self._ctx.runtimes[rec.id] = rt
            crash_point("reconcile")
        report.update(self.store.reconcile_disk())
        self.store.gc_layers()
        # An import killed midway left only tmp/ (wiped above); digests of freed layers go.
        report["layer_digests_swept"] = self.store.sweep_layer_digests()
        log.info("sandbox.reconciled", **report)
        return report

    def _thaw_adopted(self, rec: SandboxRecord, report: dict) -> bool:
        """Thaw an adopted sandbox: a daemon killed during a checkpoint (sink or dump)
        or a rollback to a body double (switched, not yet resumed) left it frozen,
        and every call into it would hang. False if it cannot be thawed (it is then
        restarted on its branch)."""
        try:
            if not self._is_frozen(rec.branch_id):
                # A double woken by a rollback just before a crash may not have its CPU
                # weight back yet (DeltaCR.wake gives it back after the reply).
                with contextlib.suppress(OSError):
                    self.cgroups.set_background(rec.branch_id, False)
                return True
            self.cgroups.set_background(rec.branch_id, False)  # see DeltaCR.wake
            self.cgroups.thaw(rec.branch_id)
        except (OSError, TimeoutError) as e:
            log.error("reconcile.thaw_failed", sandbox=rec.id, error=str(e))
            return False
        log.warning("reconcile.thawed", sandbox=rec.id)
        report["thawed"] += 1
        return True

    def _is_frozen(self, name: str) -> bool:
        """Whether the cgroup is frozen or freezing (v1 freezer.state, v2 cgroup.events).
        A cgroup gone meanwhile (ENOENT, or ENODEV: being removed) is not frozen: its
        init is gone with it, which the caller's next step (a thaw) finds out."""
        d = self.cgroups.freezer_path(name)
        try:
            if (d / "freezer.state").exists():
                return (d / "freezer.state").read_text().strip() != "THAWED"
            return "frozen 1" in (d / "cgroup.events").read_text() \
                or (d / "cgroup.freeze").read_text().strip() == "1"
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise
            return False

    def _recover_manifest(self, rec: SandboxRecord, rt: Runtime) -> None:
        """After a restart: which layers this branch sank, and a manifest naming
        their paths (keys unknown, so the next checkpoint re-sinks the upper)."""
        lower = self.store.get_branch(rec.branch_id).lower
        if rec.head:
            layers = self.store.get_checkpoint(rec.head).layers
            if layers[:len(lower)] == lower:
                rt.own_layers = list(layers[len(lower):])
        rt.manifest = deltafs.manifest_from_layers(
            self.store.layer_path(lid) for lid in rt.own_layers)

    async def _watch_inits(self) -> None:
        """Mark sandboxes whose init died as 'stopped' (and reap the init)."""
        runtimes = self._ctx.runtimes
        while True:
            await asyncio.sleep(1.0)
            self._incarnations.reap()
            for sid, rt in list(runtimes.items()):
                if rt.lock.locked() or alive(rt.init_pid):
                    continue
                # Under the lifecycle lock, as a destroy: a destroy (or shutdown) that
                # comes meanwhile waits, and one that came first leaves nothing to mark.
                async with rt.lock:
                    if runtimes.get(sid) is not rt or rt.closed or alive(rt.init_pid):
                        continue
                    log.warning("sandbox.init_died", sandbox=sid, pid=rt.init_pid)
                    runtimes.pop(sid, None)
                    await self._standbys.drop(rt)
                    try:
                        await asyncio.to_thread(self.store.set_sandbox_state, sid,
                                                SandboxState.STOPPED)
                    except NotFound:  # destroyed meanwhile
                        pass

    async def shutdown(self, keep_sandboxes: bool = False) -> None:
        """Stop every sandbox's processes and unmount its branch. Records stay
        'running', so the next start restarts them (files kept, processes fresh).
        `keep_sandboxes`: drop only what no later daemon adopts (standbys, warm pools,
        background work); sandboxes stay running and mounted for the next start."""
        ctx, inc = self._ctx, self._incarnations
        if self._monitor:
            # Ended before the teardown below: a monitor still dropping a dead sandbox's
            # standbys would retire them concurrently with it.
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        ctx.stopping = True
        for rt in ctx.runtimes.values():
            rt.closed = True
        # Doubles being built are aborted (their CRIU restores killed), not waited for;
        # each build retires what it made.
        for sandbox_id, rt in list(ctx.runtimes.items()):
            await self._standbys.cancel(sandbox_id, rt)
        # Other background work (warm pools, squashes) finishes rather than being
        # cancelled mid-step -- a cancelled task leaves its worker thread running and
        # what it creates unretired -- but a CRIU restore in it (a warm pool's), or in a
        # call the server cut off (a rollback's, a fork's: its thread runs on), is
        # aborted, again until all is done. A restore starting later is refused
        # (`stopping`, checked by `Incarnations.launch` as criu enters the cgroup).
        while True:
            await asyncio.to_thread(inc.abort_restores)
            if not ctx.background:
                break
            done, _ = await asyncio.wait(list(ctx.background), timeout=0.05)
            for task in done:  # their failures retrieved (and dropped), as gather did
                if not task.cancelled():
                    task.exception()
        for rt in ctx.runtimes.values():
            await self._standbys.drop(rt)
        await self._pools.drop_all()
        # Retires those drops spawned (a stale warm incarnation, a standby no slot
        # wants) end before the kills and the stray sweep below, not alongside them.
        while ctx.background:
            await asyncio.gather(*list(ctx.background), return_exceptions=True)
        if keep_sandboxes:
            ctx.runtimes.clear()
            return
        # Every recorded sandbox, running or not (a stopped one is still mounted).
        for rec in await asyncio.to_thread(self.store.list_sandboxes):
            rt = ctx.runtimes.get(rec.id)
            await asyncio.to_thread(inc.kill, rec.branch_id,
                                    rt.init_pid if rt else rec.init_pid, rec)
        ctx.runtimes.clear()
        # Then whatever no record or pool names (an incarnation some failed step left
        # behind): its processes and mounts would keep the store busy, its loop attached.
        await asyncio.to_thread(self._sweep_strays)
        await asyncio.to_thread(self.cgroups.release_parents)

    def _sweep_strays(self) -> None:
        for name in self.cgroups.names():
            log.error("shutdown.stray_cgroup", cgroup=name)
            try:
                self._incarnations.kill(name, 0)
            except (OSError, TimeoutError) as e:
                log.error("shutdown.stray_cgroup_failed", cgroup=name, error=str(e))
        for target in linux.mounts_under(self.store.mnt_dir):
            if target != str(self.store.mnt_dir):
                log.error("shutdown.stray_mount", mount=target)
                linux.umount(target, linux.MNT_DETACH)
