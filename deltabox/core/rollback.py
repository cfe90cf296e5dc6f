"""Rollback: a sandbox becomes an incarnation of one of its checkpoints.

Restore first, then switch: the new incarnation (a ready standby or body double of the
checkpoint, else a CRIU restore or a fresh init next to the old tree -- raced against a
double still being built, the first one ready wins) is up before anything of the old one
is touched; then the records switch in one transaction and the old tree is
killed. A rollback that fails leaves the sandbox exactly as it was. Which incarnation is
used, and what waking it means, is DeltaCR's to say (`deltabox.core.deltacr`).

The reply leaves right after the commit (issue 10, target 6): thawing the new
incarnation, killing the old tree, metrics, the log line and the next double wait until
it has left (`deltabox.core.after_reply`) -- and run before the caller's next call
arrives. A crash in between keeps the rollback (reconciliation thaws, and kills what no
record owns).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from deltabox.core import deltafs
from deltabox.core.after_reply import after_reply
from deltabox.core.deltacr import DeltaCR
from deltabox.core.incarnation import Incarnations, kill_quiet
from deltabox.core.runtime import Runtime, SandboxContext, Standby
from deltabox.core.standbys import Standbys
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
        "standby-waited" (one was being built and was ready before the restore started
        next to it: timings["wait_ms"]), "restore" / "fresh" (none was ready first). It runs to its end
        even if the caller goes away (what it builds must not be left unowned); the
        checkpoint is held meanwhile, so a deletion of it waits.

        The hot path (a double of the checkpoint is ready, no network to attach, the
        store's lock free) runs in the caller's task, a loop turn less each way: once the
        sandbox's lock is held it never awaits, so a caller going away cannot stop it
        halfway. Anything else runs in a task of its own."""
        if self._standbys.ready(checkpoint_id):
            async with self._ctx.holds.hold(checkpoint_id):
                done = await self._rollback(ref, checkpoint_id, hot_only=True)
            if done is not None:
                return done

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

    async def _rollback(self, ref: str, checkpoint_id: str, hot_only: bool = False
                        ) -> tuple[SandboxRecord, str, dict] | None:
        """`hot_only`: None (nothing done) unless it takes the hot path, which does not
        await once the lock is held."""
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
        turned: list = []  # non-empty once the loop turned: this call waited for the lock
        asyncio.get_running_loop().call_soon(turned.append, True)
        async with rt.lock:
            if turned:  # other calls ran meanwhile: the records may have changed
                rec = self.store.get_sandbox(rec.id)
                ckpt = self.store.get_checkpoint(ckpt.id)
            if rt.closed or ctx.runtimes.get(rec.id) is not rt \
                    or rec.state != SandboxState.RUNNING:
                raise FailedPrecondition(f"sandbox {rec.name} is {rec.state}, not running")
            old_branch, old_pid = rt.branch_id, rt.init_pid
            if hot_only:
                if rec.spec.get("network") == NetworkMode.NAT or not self._has_current(rt, ckpt):
                    return None
                # The switch on the loop, with the store's lock taken now and held until
                # it is recorded: never waited for (a worker thread's transaction holds
                # it: this rollback takes the task path, its switch run by that thread
                # as it lets the lock go: `_switch`).
                with self.store.lock_if_free() as free:
                    if not free:
                        return None
                    standby, path, failed = self._take_and_switch(rec, rt, ckpt)
                if failed is not None:
                    await asyncio.to_thread(inc.retire, standby.branch_id, standby.init_pid)
                    raise failed
            else:
                self._standbys.rolled_back(rt, ckpt)  # the double policy learns from it
                standby = self._take_current(rt, ckpt)
                prepared, waited = standby is not None, False
                if standby is None:
                    self._deltacr.refuse_unusable_now(ckpt)  # its double may have failed
                    standby, prepared = await self._first_ready(rec, rt, ckpt, timings)
                    waited = prepared
                path = self._deltacr.rollback_path(ckpt, prepared, waited)
                try:
                    crash_point("rollback.before_switch")
                    await self._switch(rec, standby, ckpt)
                except BaseException:
                    await asyncio.to_thread(inc.retire, standby.branch_id, standby.init_pid)
                    raise
            new_branch, pid = standby.branch_id, standby.init_pid
            crash_point("rollback.after_switch")
            # SIGKILL to the old init ends its whole pid namespace: after the reply
            # (`_after_switch`), unless the new tree needs its network (one veth name).
            nat = rec.spec.get("network") == NetworkMode.NAT
            if nat:
                kill_quiet(old_pid)
            self._deltacr.wake(ckpt, new_branch, reply_first=True)  # thawed after the reply
            rt.init_pid, rt.branch_id = pid, new_branch
            rt.own_layers, rt.manifest = [], deltafs.Manifest()
            rt.session_locks.clear()
            if nat:
                await asyncio.to_thread(inc.attach_network, rec, pid,
                                        self.store.mnt_dir / new_branch)
        timings["total_ms"] = 1000 * (time.perf_counter() - t0)
        # The record is committed (a crash from here on keeps the rollback): the rest
        # waits until the reply has left (issue 10, target 6).
        after_reply(self._after_switch, rec.id, ckpt.id, path, timings, old_branch, old_pid,
                    not nat)
        return rec, path, timings

    def _after_switch(self, sandbox_id: str, checkpoint_id: str, path: str, timings: dict,
                      old_branch: str, old_pid: int, kill: bool) -> None:
        """A rollback's tail, once its reply has left (after the new tree's thaw): the
        old tree killed (unmounting and deleting its branch wait for a quiet moment),
        the next double, metrics; the log line (~0.15 ms) a little later, so that the
        caller's next call does not wait for it."""
        ctx = self._ctx
        crash_point("rollback.after_reply")
        if kill:
            kill_quiet(old_pid)
        ctx.spawn(self._retire_later(old_branch, old_pid))
        # The other hot checkpoints keep their doubles; this one gets its replacement.
        ctx.spawn(self._standbys.prepare(sandbox_id, checkpoint_id, used=True))
        ctx.metrics.rollbacks.labels(path).inc()
        ctx.metrics.rollback_seconds.labels(path).observe(timings["total_ms"] / 1000)
        asyncio.get_running_loop().call_later(
            self._standbys.BUILD_DELAY_S, lambda: log.info(
                "sandbox.rolled_back", sandbox=sandbox_id, checkpoint=checkpoint_id,
                path=path, **timings))

    def _take_and_switch(self, rec: SandboxRecord, rt: Runtime, ckpt: CheckpointRecord
                         ) -> tuple[Standby, str, BaseException | None]:
        """The hot path's switch, on the loop with the store's lock held (it does not
        await): its ready incarnation (there is one: `_has_current`) taken, the records
        switched -- (it, the path, None), or (it, path, the error) to retire it with the
        lock released."""
        self._standbys.rolled_back(rt, ckpt)  # the double policy learns from it
        standby = self._take_current(rt, ckpt)
        path = self._deltacr.rollback_path(ckpt, True, False)
        try:
            crash_point("rollback.before_switch")
            self.store.switch_branch(rec, standby.branch_id, ckpt.mount_layers, ckpt.id,
                                     standby.init_pid, standby.init_start)
        except BaseException as e:  # noqa: BLE001 - handed back, raised by the caller
            return standby, path, e
        return standby, path, None

    async def _switch(self, rec: SandboxRecord, standby: Standby,
                      ckpt: CheckpointRecord) -> None:
        """The records switch, in one transaction: on the loop when the store's lock is
        free (no thread hop), else by the worker thread holding it, as it lets it go and
        before any thread waiting for it (`Store.switch_soon`) -- waiting for a worker's
        transaction on the loop would stall every call of the daemon, and a thread of the
        pool queued for the lock behind the workers' transactions. Either way under the
        sandbox's lock, so ordered with its checkpoints; committed before the reply."""
        fut = self.store.switch_soon(self.store.switch_branch, rec, standby.branch_id,
                                     ckpt.mount_layers, ckpt.id, standby.init_pid,
                                     standby.init_start)
        if not fut.done():
            await asyncio.wrap_future(fut)
        fut.result()

    @staticmethod
    def _has_current(rt: Runtime, ckpt: CheckpointRecord) -> bool:
        """Whether `_take_current` would find one (it takes nothing)."""
        layers = tuple(ckpt.mount_layers)
        return any(sb.layers == layers for sb in rt.standby.doubles.get(ckpt.id, ()))

    def _take_current(self, rt: Runtime, ckpt: CheckpointRecord) -> Standby | None:
        """A ready incarnation of `ckpt` on its current layers. One built before a squash
        rebased the checkpoint mounts layers the squash lets go (and deletes): retired."""
        while (standby := rt.standby.take(ckpt.id)) is not None:
            if standby.layers == tuple(ckpt.mount_layers):
                return standby
            log.info("standby.stale", checkpoint=ckpt.id, branch=standby.branch_id)
            self._ctx.spawn(asyncio.to_thread(self._incarnations.retire, standby.branch_id,
                                              standby.init_pid))
        return None

    async def _retire_later(self, branch_id: str, init_pid: int) -> None:
        """The old tree is killed already; unmounting and deleting its branch wait until
        the reply (and the caller's next call) had the CPU: until no call is in flight."""
        await asyncio.sleep(self._standbys.BUILD_DELAY_S)
        await self._standbys.gate.quiet()
        await asyncio.to_thread(self._incarnations.retire, branch_id, init_pid)

    async def _first_ready(self, rec: SandboxRecord, rt: Runtime, ckpt: CheckpointRecord,
                           timings: dict) -> tuple[Standby, bool]:
        """No incarnation of `ckpt` is ready: restore it next to the old tree and, if
        one is being built, take whichever is ready first -- (it, whether it is the
        prepared one). A build started just before (right after a checkpoint) may be
        near its end or still waiting for CPU: racing never makes the rollback slower
        than a restore. The loser is not wasted: a restore that loses joins the slot
        as one more double (or is retired), a build that loses stays in the slot."""
        slot, t_wait = rt.standby, time.perf_counter()
        restore = asyncio.ensure_future(self._restore(rec, ckpt))
        try:
            while True:
                standby = self._take_current(rt, ckpt)
                if standby is not None:
                    timings["wait_ms"] = 1000 * (time.perf_counter() - t_wait)
                    slot.build_started(ckpt.id)  # the restore still running counts as one
                    self._ctx.spawn(self._adopt_restore(rec.id, rt, ckpt.id, restore))
                    return standby, True
                if restore.done() and (restore.exception() is None
                                       or not slot.building(ckpt.id)):
                    return restore.result(), False
                if not slot.building(ckpt.id):
                    return await restore, False
                change = asyncio.ensure_future(slot.next_change())
                waits = {change} if restore.done() else {change, restore}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
        except BaseException:
            self._ctx.spawn(self._adopt_restore(rec.id, rt, ckpt.id, restore, keep=False))
            raise

    async def _restore(self, rec: SandboxRecord, ckpt: CheckpointRecord) -> Standby:
        """A new incarnation of `ckpt`, next to the old tree: its own branch, cgroup and
        namespaces, left frozen (`DeltaCR.wake` thaws it). The network is attached once
        the old tree is gone (one veth name)."""
        inc, branch = self._incarnations, new_id("br")
        await asyncio.to_thread(self.store.new_branch_dirs, branch, ckpt.mount_layers, rec.spec)
        try:
            pid, start = await asyncio.to_thread(
                inc.launch, rec, self.store.branch_mount_for(branch, ckpt.mount_layers),
                False, self._deltacr.images_for(ckpt), True)
        except BaseException as e:
            await asyncio.to_thread(inc.retire, branch, 0)
            self._deltacr.after_restore_failure(rec, ckpt, e)
            raise
        return Standby(branch, ckpt.id, pid, start, tuple(ckpt.mount_layers))

    async def _adopt_restore(self, sandbox_id: str, rt: Runtime, checkpoint_id: str,
                             restore: asyncio.Future, keep: bool = True) -> None:
        """A restore that lost the race: one more double of its checkpoint, if wanted."""
        try:
            sb = await restore
        except BaseException:  # noqa: BLE001 - a failed restore retired itself
            return
        finally:
            if keep:
                rt.standby.build_ended(checkpoint_id)
        if keep:
            self._standbys.keep_or_retire(sandbox_id, rt, sb)
        else:
            await asyncio.to_thread(self._incarnations.retire, sb.branch_id, sb.init_pid)
