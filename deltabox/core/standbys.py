"""Standbys: each running sandbox's prepared incarnations of its hot checkpoints.

Body doubles (full checkpoints: the processes restored by `DeltaCR.build_double` and left
frozen) or standbys (fs: an init running on a fresh branch of the checkpoint's files), kept
for the checkpoints a rollback is likely to go to, within the one memory budget
(`deltabox.core.warm.MemoryBudget`). Whether a full checkpoint gets one at all, and when a
build may start, is `deltabox.core.double_policy`'s call; rolling back to a prepared one is
`deltabox.core.rollback`'s. Split from `deltabox.core.deltacr` (which re-exports it) to keep
both modules readable.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from deltabox.core.double_policy import BuildGate, DoublePolicy
from deltabox.core.incarnation import Incarnations
from deltabox.core.runtime import Runtime, SandboxContext, Standby
from deltabox.core.warm import MemoryBudget
from deltabox.errors import NotFound
from deltabox.store.records import CheckpointRecord
from deltabox.types import CheckpointMode

if TYPE_CHECKING:
    from deltabox.core.deltacr import DeltaCR

__all__ = ["Standbys"]

log = structlog.get_logger("deltabox.core.standbys")


class Standbys:
    """Each running sandbox's prepared incarnations of its **hot** checkpoints: body
    doubles (full: the processes restored and frozen) or standbys (fs: an init running on
    a fresh branch of the checkpoint's files). Rolling back to a hot checkpoint then only
    swaps records, kills the old tree and thaws (`deltabox.core.rollback`).

    Policy (docs/deltacr.md, "The double lifecycle"):
    - hot = the `config.hot_checkpoints` checkpoints the sandbox made or rolled back to
      last (LRU), plus pinned ones, plus those named in a Warm; a checkpoint falling out
      of that set has its incarnations retired;
    - the hottest one, once it has been rolled back to, gets `config.hottest_pool`
      incarnations, so back-to-back rollbacks to it find one while the used one's
      replacement is built; the others (a checkpoint just made too) one each;
    - a full checkpoint gets them only when `deltabox.core.double_policy` says a rollback
      to it is likely (the call's hint, or the sandbox's learnt rollback rate);
    - builds run one at a time per sandbox, hottest first, `BUILD_DELAY_S` after the call
      that asked for them (its reply leaves first), at most `restore_parallelism` at once
      daemon-wide (`BuildGate`; queued builds go by `DoublePolicy.build_priority`: those
      of sandboxes that roll back often first), each when no client call is in flight
      (at most `DoublePolicy.max_yield_s`), CRIU at nice `BACKGROUND_NICE`;
    - all of it within the one MemoryBudget (`deltabox.core.warm`): over it, least
      recently used incarnations (pools and doubles) are evicted; if it still does not
      fit, no incarnation is made and that rollback takes the restore path."""

    BUILD_DELAY_S = 0.02

    def __init__(self, ctx: SandboxContext, deltacr: DeltaCR, incarnations: Incarnations,
                 budget: MemoryBudget) -> None:
        self._ctx = ctx
        self._deltacr = deltacr
        self._incarnations = incarnations
        self._budget = budget
        budget.standbys = self  # the budget evicts doubles too
        self.policy = DoublePolicy(ctx.config.double_policy)
        self.gate = BuildGate(ctx.config.restore_parallelism, ctx.metrics.in_flight)
        self._full: dict[str, bool] = {}  # checkpoint -> FULL mode (cache of the store's)

    def ready(self, checkpoint_id: str) -> bool:
        """Whether a body double (full) or standby (fs) of the checkpoint is built and
        waiting: a rollback to it now takes the "double" / "standby" path."""
        return any(rt.standby.ready(checkpoint_id) for rt in self._ctx.runtimes.values())

    def _is_full(self, checkpoint_id: str) -> bool:
        if checkpoint_id not in self._full:
            try:
                mode = self._ctx.store.get_checkpoint(checkpoint_id).mode
            except NotFound:
                return False
            self._full[checkpoint_id] = mode == CheckpointMode.FULL
        return self._full[checkpoint_id]

    def _wanted(self, slot, checkpoint_id: str) -> int:
        if checkpoint_id not in slot.hot:
            return 0
        full = self._is_full(checkpoint_id)
        if full and not self.policy.wants(slot, checkpoint_id):
            return 0
        if checkpoint_id in slot.used and slot.hottest()[0] == checkpoint_id \
                and (not full or self.policy.wants_pool(slot, checkpoint_id)):
            return max(1, self._ctx.config.hottest_pool)
        return 1

    def rolled_back(self, rt: Runtime, ckpt: CheckpointRecord) -> None:
        """A rollback to `ckpt` begins: the policy learns from it (was it hot?)."""
        self.policy.rolled_back(rt.standby, ckpt.id, ckpt.mode == CheckpointMode.FULL,
                                ckpt.id in rt.standby.hot)

    async def prepare(self, sandbox_id: str, checkpoint_id: str, used: bool = False,
                      rollback_likely: bool | None = None, urgent: bool = False) -> None:
        """`checkpoint_id` is the sandbox's hottest checkpoint now (just made, or just
        rolled back to: `used`): keep incarnations of it and of the other hot ones ready
        (a full one's only as the double policy says; `rollback_likely`: the checkpoint
        call's hint). Returns once the first incarnation of `checkpoint_id` is ready or
        known not to come (not wanted, over the budget, failed): what
        `Checkpoint(wait_ready)` waits for (`urgent`: its build does not yield to calls).

        A sandbox destroyed or rolled away meanwhile builds nothing or retires what it
        built -- nothing is ever left unowned."""
        rt = self._ctx.runtimes.get(sandbox_id)
        if rt is None or rt.closed or self._ctx.stopping or not self._ctx.config.standby:
            return
        slot = rt.standby
        if not used:  # a checkpoint was taken
            self.policy.checkpointed(slot, checkpoint_id, self._is_full(checkpoint_id),
                                     rollback_likely)
        slot.touch(checkpoint_id)
        if used:
            slot.used.add(checkpoint_id)
        slot.unbuildable.discard(checkpoint_id)
        await self._trim(rt)
        if urgent:
            self.policy.urgent.add(checkpoint_id)
        try:
            self._start_filling(sandbox_id, rt)
            while not slot.ready(checkpoint_id) and self._wanted(slot, checkpoint_id) \
                    and checkpoint_id not in slot.unbuildable and slot.is_filling():
                await slot.next_change()
        finally:
            if urgent:
                self.policy.urgent.discard(checkpoint_id)

    async def hint(self, checkpoint_id: str) -> None:
        """A Warm named the checkpoint: its sandbox keeps it hot (the hottest stays)."""
        try:
            ckpt = self._ctx.store.get_checkpoint(checkpoint_id)
        except NotFound:
            return
        rt = self._ctx.runtimes.get(ckpt.sandbox_id)
        if rt is None or rt.closed or self._ctx.stopping or not self._ctx.config.standby:
            return
        slot = rt.standby
        self.policy.habits(slot).hints[checkpoint_id] = True  # asked for by name
        if checkpoint_id not in slot.hot:
            hottest = slot.hottest()
            slot.touch(checkpoint_id)
            if hottest:
                slot.touch(hottest[0])
            await self._trim(rt)
        self._start_filling(ckpt.sandbox_id, rt)

    async def _trim(self, rt: Runtime) -> None:
        """Checkpoints beyond the K most recent (pinned ones aside) are not hot any more."""
        slot, keep = rt.standby, max(1, self._ctx.config.hot_checkpoints)
        for cid in slot.hottest()[keep:]:
            try:
                if self._ctx.store.get_checkpoint(cid).pinned:
                    continue
            except NotFound:
                pass
            del slot.hot[cid]
            slot.used.discard(cid)
            self.policy.forget_checkpoint(slot, cid)
            self._full.pop(cid, None)
            await self._retire(slot.remove(cid))

    def _start_filling(self, sandbox_id: str, rt: Runtime) -> None:
        if not rt.standby.is_filling() and not rt.closed:
            rt.standby.filling = self._ctx.spawn(self._fill(sandbox_id, rt))

    async def _fill(self, sandbox_id: str, rt: Runtime) -> None:
        """Build the missing incarnations -- the first one of each hot checkpoint before
        a second one of the hottest, the most recent first -- one at a time (each is a
        CRIU restore: CPU-bound). A running filler picks up what was asked meanwhile."""
        slot, ctx = rt.standby, self._ctx
        try:
            first = True
            while not (rt.closed or ctx.stopping) and ctx.runtimes.get(sandbox_id) is rt:
                have = {c: slot.ready(c) + slot.building(c) for c in slot.hottest()}
                todo = [c for c in have if c not in slot.unbuildable
                        and have[c] < self._wanted(slot, c)]
                # one a call waits for comes first
                todo.sort(key=lambda c: c not in self.policy.urgent)
                if not todo:
                    break
                cid = min(todo, key=lambda c: have[c])  # stable: urgent, the most recent
                slot.build_started(cid)  # counted from now: a rollback races it
                try:
                    if first:  # the reply that asked for it leaves first
                        first = False
                        await asyncio.sleep(self.BUILD_DELAY_S)
                    # The queue for a slot is ordered by how soon the build is likely to
                    # be used (a call waiting for it first), evaluated when a slot frees.
                    async with self.gate.slot(
                            lambda: self.policy.build_priority(slot, cid)):
                        if self._stale(sandbox_id, rt, cid):
                            # No longer hot or wanted while it queued: the slot is not
                            # held through a quiet wait for nothing.
                            continue
                        if cid not in self.policy.urgent:  # a call waits for it: no yield
                            await self.gate.quiet(self.policy.max_yield_s(slot, cid))
                        standby = await self._reaped_if_cancelled(
                            self._build_within_budget(sandbox_id, rt, cid))
                finally:
                    slot.build_ended(cid)
                if standby is None:
                    slot.unbuildable.add(cid)
                    continue
                self.keep_or_retire(sandbox_id, rt, standby)
        finally:
            slot.filling = None
            slot.changed()  # prepare() waiting on a decision sees the filler gone

    def _stale(self, sandbox_id: str, rt: Runtime, checkpoint_id: str) -> bool:
        """Whether a build that waited for a slot is not needed any more: the sandbox
        is gone, the checkpoint fell out of the hot set, or enough incarnations of it
        are ready or being built besides this one."""
        slot = rt.standby
        return rt.closed or self._ctx.stopping or self._ctx.runtimes.get(sandbox_id) is not rt \
            or checkpoint_id not in slot.hot \
            or slot.ready(checkpoint_id) + slot.building(checkpoint_id) - 1 \
            >= self._wanted(slot, checkpoint_id)

    async def _reaped_if_cancelled(self, build) -> Standby | None:
        """Run one build; if the filler is cancelled meanwhile (`cancel`), the build still
        runs to its end -- CRIU restores in a worker thread that a cancellation cannot
        stop, and what it makes must not be left unowned -- and is retired, then the
        cancellation goes on. A cancelled filler thus waits for one build at most."""
        task = asyncio.ensure_future(build)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            try:
                standby = await task
            except Exception:  # noqa: BLE001 - a failed build retired what it made
                standby = None
            if standby is not None:
                await self._retire([standby])
            raise

    async def cancel(self, sandbox_id: str, rt: Runtime) -> None:
        """The sandbox is being destroyed (or the daemon stops): end its builds now.
        Builds still waiting (their delay, a build slot held by other sandboxes' builds,
        a quiet moment, room in the budget) are dropped; one in flight, and a rollback's
        restore that lost its race (`RollbackPaths._adopt_restore`), are aborted -- their
        CRIU restores killed (`Incarnations.abort_restores`) -- and retire what they
        made. A destroy thus waits neither behind the daemon's other builds nor behind
        its own (nor a CRIU restore that hangs until its timeout)."""
        rt.closed = True
        slot, task = rt.standby, rt.standby.filling
        if task is not None and not task.done():
            task.cancel()
        # Aborted again until done: a build past its last check of `closed` may start
        # its restore after the first abort.
        while (task is not None and not task.done()) or slot.builds:
            await asyncio.to_thread(self._incarnations.abort_restores, sandbox_id)
            change = asyncio.ensure_future(slot.next_change())
            await asyncio.wait({change} | ({task} if task else set()), timeout=0.05)
            change.cancel()

    async def _build_within_budget(self, sandbox_id: str, rt: Runtime,
                                   checkpoint_id: str) -> Standby | None:
        ctx = self._ctx
        # A double will hold about what the sandbox holds now.
        need = ctx.cgroups.memory_usage(rt.branch_id)
        if not await self._budget.make_room(need, keep=checkpoint_id):
            # Over the memory budget: no double; a rollback takes the restore path
            # (and prepares one again if there is room then).
            log.info("standby.skipped_over_budget", sandbox=sandbox_id,
                     checkpoint=checkpoint_id, budget=ctx.config.warm_budget_bytes)
            return None
        if rt.closed or checkpoint_id not in rt.standby.hot:
            return None
        async with ctx.holds.hold(checkpoint_id):  # not deleted under the build
            return await self._build(sandbox_id, checkpoint_id)

    def keep_or_retire(self, sandbox_id: str, rt: Runtime, standby: Standby) -> None:
        """A new incarnation joins the slot if its checkpoint is still hot and wants it."""
        slot, cid = rt.standby, standby.checkpoint_id
        if rt.closed or self._ctx.stopping or self._ctx.runtimes.get(sandbox_id) is not rt \
                or slot.ready(cid) >= self._wanted(slot, cid):
            self._ctx.spawn(self._retire([standby]))
            slot.changed()
            return
        slot.put(standby)

    async def _build(self, sandbox_id: str, checkpoint_id: str) -> Standby | None:
        try:
            rec = self._ctx.store.get_sandbox(sandbox_id)
            ckpt = self._ctx.store.get_checkpoint(checkpoint_id)
        except NotFound:
            return None
        return await self._deltacr.build_double(rec, ckpt, "standby")

    async def _retire(self, standbys: list[Standby]) -> None:
        for sb in standbys:
            await asyncio.to_thread(self._incarnations.retire, sb.branch_id, sb.init_pid)

    async def drop(self, rt: Runtime) -> None:
        """Retire all of a sandbox's incarnations (it is destroyed or stopped)."""
        slot = rt.standby
        ready = slot.all()
        slot.doubles.clear()
        slot.hot.clear()
        slot.used.clear()
        self.policy.forget(slot)
        await self._retire(ready)

    async def drop_for(self, checkpoint_id: str) -> None:
        """Drop the standbys of a deleted checkpoint."""
        self._full.pop(checkpoint_id, None)
        for rt in self._ctx.runtimes.values():
            self.policy.forget_checkpoint(rt.standby, checkpoint_id)
            rt.standby.hot.pop(checkpoint_id, None)
            await self._retire(rt.standby.remove(checkpoint_id))

    # ---- the memory budget's side (deltabox.core.warm.MemoryBudget) -------------------

    def held(self) -> list[Standby]:
        return [sb for rt in self._ctx.runtimes.values() for sb in rt.standby.all()]

    def evictable(self) -> list[tuple[float, str, str]]:
        """(last use, sandbox, checkpoint) of every checkpoint with ready incarnations."""
        return [(rt.standby.hot.get(cid, 0.0), sid, cid)
                for sid, rt in self._ctx.runtimes.items() for cid in rt.standby.doubles]

    async def evict(self, sandbox_id: str, checkpoint_id: str) -> None:
        """Drop one ready incarnation of the checkpoint (the budget asks again if needed)."""
        rt = self._ctx.runtimes.get(sandbox_id)
        if rt is not None:
            pool = rt.standby.doubles.get(checkpoint_id)
            if pool:
                sb = pool.pop()
                if not pool:
                    del rt.standby.doubles[checkpoint_id]
                await self._retire([sb])
