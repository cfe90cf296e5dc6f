"""Warm pools for forks, and the one memory budget of prepared incarnations.

`warm(checkpoint, n)` prepares up to n incarnations of a checkpoint ahead of a fork (body
doubles for full checkpoints, inits on ready branches for fs ones); `fork` adopts them first
(`take`). Restores run `config.restore_parallelism` at a time.

Prepared incarnations -- warm pools and every sandbox's body doubles / standbys -- hold
memory the sandboxes did not ask for; `MemoryBudget` keeps them together under
`config.warm_budget_bytes`, evicting the least recently used first (a whole pool, or one
double) to make room. An evicted checkpoint stays restorable
(its images are on the store): only the head start is lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from deltabox.core.incarnation import Incarnations
from deltabox.core.runtime import SandboxContext, Standby
from deltabox.errors import FailedPrecondition, InvalidArgument, NotFound
from deltabox.store.records import CheckpointRecord, SandboxRecord
from deltabox.types import CheckpointMode, NetworkMode

if TYPE_CHECKING:
    from deltabox.core.deltacr import DeltaCR, Standbys

__all__ = ["WarmPools", "MemoryBudget", "child_spec"]

log = structlog.get_logger("deltabox.core.warm")


def child_spec(ckpt: CheckpointRecord) -> dict:
    """The spec of a sandbox made from `ckpt` (a fork's child): its network gets its own
    address."""
    return {k: v for k, v in ckpt.spec.items() if k not in ("net_index", "ip_address")}


class MemoryBudget:
    """Memory held by prepared incarnations (warm pools and sandboxes' body doubles /
    standbys) against `config.warm_budget_bytes`. Eviction takes the least recently used
    first across both kinds: a warm pool as a whole, a sandbox's double one at a time."""

    def __init__(self, ctx: SandboxContext, pools: WarmPools) -> None:
        self._ctx = ctx
        self._pools = pools
        self.standbys: Standbys | None = None  # set by Standbys (it is built after us)

    def held(self) -> int:
        usage = self._ctx.cgroups.memory_usage
        doubles = self.standbys.held() if self.standbys is not None else []
        return sum(usage(sb.branch_id) for sb in [*self._pools.incarnations(), *doubles])

    def fits(self, need: int) -> bool:
        return self.held() + need <= self._ctx.config.warm_budget_bytes

    async def make_room(self, need: int, keep: str) -> bool:
        """Whether `need` more bytes fit, after evicting (but `keep`'s) if not. (Each
        `fits` reads every prepared incarnation's memory.current: once when it fits.)"""
        if self.fits(need):
            return True
        await self._evict(keep, need)
        return self.fits(need)

    async def _evict(self, keep: str, need: int) -> None:
        """Drop least recently used incarnations until `need` more bytes fit under the
        budget. Pinned checkpoints keep theirs."""
        while not self.fits(need):
            victims = [(t, "pool", "", cid) for cid, t in self._pools.last_used()]
            if self.standbys is not None:
                victims += [(t, "double", sid, cid) for t, sid, cid in self.standbys.evictable()]
            victims = [v for v in sorted(victims) if v[3] != keep and not self._pinned(v[3])]
            if not victims:
                return
            _, kind, sid, cid = victims[0]
            if kind == "pool":
                await self._pools.drop(cid)
            else:
                await self.standbys.evict(sid, cid)
            log.info("warm.evicted", kind=kind, checkpoint=cid, sandbox=sid or None)

    def _pinned(self, checkpoint_id: str) -> bool:
        try:
            return self._ctx.store.get_checkpoint(checkpoint_id).pinned
        except NotFound:
            return False


class WarmPools:
    """Prepared incarnations of checkpoints, waiting for a fork."""

    def __init__(self, ctx: SandboxContext, deltacr: DeltaCR,
                 incarnations: Incarnations) -> None:
        self._ctx = ctx
        self._deltacr = deltacr
        self._incarnations = incarnations
        self._pools: dict[str, list[Standby]] = {}  # checkpoint -> its warm incarnations
        self._used: dict[str, float] = {}  # checkpoint -> last use (LRU)
        self._restores = asyncio.Semaphore(ctx.config.restore_parallelism)
        self.budget = MemoryBudget(ctx, self)

    def incarnations(self):
        for pool in self._pools.values():
            yield from pool

    def last_used(self) -> list[tuple[str, float]]:
        """(checkpoint, last use) of every pool that holds incarnations."""
        return [(c, self._used.get(c, 0.0)) for c, pool in self._pools.items() if pool]

    async def warm(self, checkpoint_id: str, n: int, wait: bool = False) -> int:
        """Prepare up to n incarnations of a checkpoint for a coming fork (body doubles
        for full checkpoints, inits on ready branches for fs ones). Returns how many
        are ready (after preparing them, if `wait`)."""
        ctx = self._ctx
        if not isinstance(n, int) or not 0 <= n <= ctx.config.max_fork:
            raise InvalidArgument(f"n must be between 0 and {ctx.config.max_fork}")
        ckpt = ctx.store.get_checkpoint(checkpoint_id)
        self._deltacr.refuse_unusable(ckpt)
        if ckpt.spec.get("network") == NetworkMode.NAT:
            raise FailedPrecondition("warm forks of NAT sandboxes are not supported yet")
        pool = self._pools.setdefault(ckpt.id, [])
        self._used[ckpt.id] = time.monotonic()
        if self.budget.standbys is not None:  # its sandbox keeps it hot for rollbacks too
            ctx.spawn(self.budget.standbys.hint(ckpt.id))
        missing = max(0, n - len(pool))
        jobs = [self._warm_one(ckpt) for _ in range(missing)]
        if wait:
            await asyncio.gather(*jobs, return_exceptions=True)
        else:
            for job in jobs:
                ctx.spawn(job)
        return len(self._pools.get(ckpt.id, []))

    async def _warm_one(self, ckpt: CheckpointRecord) -> None:
        ctx = self._ctx
        if ctx.stopping:
            return
        async with self._restores, ctx.holds.hold(ckpt.id):
            if ctx.stopping or ckpt.id not in self._pools:
                return  # shut down, or dropped (a deletion, the budget) while it queued
            try:  # read again under the hold: deleted before it, or squashed since
                ckpt = ctx.store.get_checkpoint(ckpt.id)
            except NotFound:
                return
            # A double holds about its images' pages (an fs incarnation: ~nothing).
            need = int(ckpt.stats.get("image_bytes", 0))
            if not await self.budget.make_room(need, keep=ckpt.id):
                log.info("warm.skipped_over_budget", checkpoint=ckpt.id,
                         budget=ctx.config.warm_budget_bytes)
                return
            shell = SandboxRecord("", "", ckpt.image, "", "", 0.0, child_spec(ckpt))
            sb = await self._deltacr.build_double(shell, ckpt, "warm")
            if sb is None:
                return
            if ckpt.mode == CheckpointMode.FULL:  # its fork then only writes the index
                try:
                    await self._deltacr.seed_ahead(sb)
                except Exception as e:  # noqa: BLE001 - a cold child will do instead
                    log.warning("warm.seed_failed", checkpoint=ckpt.id, error=str(e))
                    await asyncio.to_thread(self._incarnations.retire, sb.branch_id,
                                            sb.init_pid)
                    return
        if ckpt.id not in self._pools or ctx.stopping:  # dropped meanwhile
            await asyncio.to_thread(self._incarnations.retire, sb.branch_id, sb.init_pid)
            return
        self._pools[ckpt.id].append(sb)

    def take(self, checkpoint_id: str, n: int) -> list[Standby]:
        """Up to n warm incarnations of the checkpoint, for a fork (they leave the pool)."""
        pool = self._pools.get(checkpoint_id, [])
        self._used[checkpoint_id] = time.monotonic()
        # One built before a squash rebased the checkpoint mounts the layers the squash
        # let go (and frees): retired, as a stale double is (core/rollback.py).
        try:
            current = self._ctx.store.get_checkpoint(checkpoint_id).mount_layers
        except NotFound:
            current = None
        for sb in [sb for sb in pool if sb.layers != current]:
            pool.remove(sb)
            log.info("warm.stale", checkpoint=checkpoint_id, branch=sb.branch_id)
            self._ctx.spawn(asyncio.to_thread(self._incarnations.retire, sb.branch_id,
                                              sb.init_pid))
        return [pool.pop() for _ in range(min(n, len(pool)))]

    async def drop(self, checkpoint_id: str) -> None:
        for sb in self._pools.pop(checkpoint_id, []):
            await asyncio.to_thread(self._incarnations.retire, sb.branch_id, sb.init_pid)

    async def drop_all(self) -> None:
        for cid in list(self._pools):
            await self.drop(cid)
