"""Rollback: a sandbox becomes an incarnation of one of its checkpoints.

Restore first, then switch: the new incarnation (the sandbox's ready standby or body
double, else a CRIU restore or a fresh init next to the old tree) is up before anything of
the old one is touched; then the records switch in one transaction and the old tree is
killed. A rollback that fails leaves the sandbox exactly as it was. Which incarnation is
used, and what waking it means, is DeltaCR's to say (`deltabox.core.deltacr`).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from deltabox.core import deltafs
from deltabox.core.deltacr import DeltaCR, Standbys
from deltabox.core.incarnation import Incarnations, kill_quiet
from deltabox.core.runtime import SandboxContext
from deltabox.errors import FailedPrecondition
from deltabox.faults import crash_point
from deltabox.store.records import CheckpointRecord, SandboxRecord, new_id
from deltabox.types import NetworkMode, SandboxState

__all__ = ["Rollbacks"]

log = structlog.get_logger("deltabox.core.rollback")


class Rollbacks:
    def __init__(self, ctx: SandboxContext, incarnations: Incarnations, deltacr: DeltaCR,
                 standbys: Standbys) -> None:
        self._ctx = ctx
        self.store = ctx.store
        self._incarnations = incarnations
        self._deltacr = deltacr
        self._standbys = standbys

    async def rollback(self, ref: str, checkpoint_id: str) -> tuple[SandboxRecord, str, dict]:
        """Roll the sandbox back to a checkpoint: (record, path taken, timings in ms).

        Paths: "double" / "standby" (a ready one was swapped in), "double-waited" /
        "standby-waited" (it was still being built: the rollback waited for it,
        timings["wait_ms"]), "restore" / "fresh" (none was ready). It runs to its end
        even if the caller goes away (what it builds must not be left unowned); the
        checkpoint is held meanwhile, so a deletion of it waits."""
        async def held():
            async with self._ctx.holds.hold(checkpoint_id):
                return await self._rollback(ref, checkpoint_id)
        task = self._ctx.spawn(held())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a caller gone
        return await asyncio.shield(task)

    def _check_in_tree(self, rec: SandboxRecord, ckpt: CheckpointRecord) -> None:
        if ckpt.sandbox_id == rec.id:
            return
        if rec.head and self.store.tree_root(rec.head) == self.store.tree_root(ckpt.id):
            return
        raise FailedPrecondition(f"checkpoint {ckpt.id} is not in the tree of sandbox "
                                 f"{rec.name}; fork it instead")

    async def _rollback(self, ref: str, checkpoint_id: str) -> tuple[SandboxRecord, str, dict]:
        ctx, inc = self._ctx, self._incarnations
        ckpt = self.store.get_checkpoint(checkpoint_id)
        rec = ctx.get(ref)
        self._check_in_tree(rec, ckpt)
        self._deltacr.refuse_unusable(ckpt)
        rt = ctx.runtimes.get(rec.id)
        if rt is None:
            raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}, not running")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        async with rt.lock:
            rec = self.store.get_sandbox(rec.id)
            if rt.closed or ctx.runtimes.get(rec.id) is not rt \
                    or rec.state != SandboxState.RUNNING:
                raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}, not running")
            slot = rt.standby
            waited = False
            if slot.building.locked() and slot.target == ckpt.id \
                    and (slot.built is None or slot.built.checkpoint_id != ckpt.id):
                t_wait = time.perf_counter()
                async with slot.building:  # almost ready: cheaper than a fresh start
                    pass
                waited = True
                timings["wait_ms"] = 1000 * (time.perf_counter() - t_wait)
            old_branch, old_pid = rt.branch_id, rt.init_pid
            standby = slot.built if slot.built and slot.built.checkpoint_id == ckpt.id else None
            if standby is None:  # its double may have failed meanwhile
                self._deltacr.refuse_unusable_now(ckpt)
            path = self._deltacr.rollback_path(ckpt, standby is not None, waited)
            if standby is not None:
                slot.built = None
                new_branch, pid, start = standby.branch_id, standby.init_pid, standby.init_start
            else:
                new_branch, pid = new_id("br"), 0
                await asyncio.to_thread(self.store.new_branch_dirs, new_branch, ckpt.mount_layers,
                                        rec.spec)
                try:
                    # Next to the old tree: its own branch, cgroup and namespaces. The
                    # network is attached once the old tree is gone (one veth name).
                    pid, start = await asyncio.to_thread(
                        inc.launch, rec, self.store.branch_mount_for(new_branch,
                                                                     ckpt.mount_layers),
                        False, self._deltacr.images_for(ckpt))
                except BaseException as e:
                    await asyncio.to_thread(inc.retire, new_branch, 0)
                    self._deltacr.after_restore_failure(rec, ckpt, e)
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
                await asyncio.to_thread(inc.retire, new_branch, pid)
                raise
            crash_point("rollback.after_switch")
            # SIGKILL to the old init ends its whole pid namespace; unmounting and
            # deleting its branch happen in the background.
            kill_quiet(old_pid)
            if standby is not None:
                self._deltacr.wake(ckpt, new_branch)  # a body double wakes up
            rt.init_pid, rt.branch_id = pid, new_branch
            rt.own_layers, rt.manifest = [], deltafs.Manifest()
            rt.session_locks.clear()
            if standby is None and slot.built is not None:  # the old head's, now unused
                unused, slot.built = slot.built, None
                ctx.spawn(asyncio.to_thread(inc.retire, unused.branch_id, unused.init_pid))
            if rec.spec.get("network") == NetworkMode.NAT:
                await asyncio.to_thread(inc.attach_network, rec, pid,
                                        self.store.mnt_dir / new_branch)
        timings["total_ms"] = 1000 * (time.perf_counter() - t0)
        ctx.spawn(asyncio.to_thread(inc.retire, old_branch, old_pid))
        ctx.spawn(self._standbys.prepare(rec.id, ckpt.id))
        ctx.metrics.rollbacks.labels(path).inc()
        ctx.metrics.rollback_seconds.labels(path).observe(timings["total_ms"] / 1000)
        log.info("sandbox.rolled_back", sandbox=rec.id, checkpoint=ckpt.id, path=path,
                 **timings)
        return self.store.get_sandbox(rec.id), path, timings
