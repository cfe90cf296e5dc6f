"""Fork: n new sandboxes from one checkpoint.

Warm incarnations (`deltabox.core.warm`) are adopted first -- recorded as new sandboxes,
woken and re-seeded by DeltaCR -- and the rest start cold through the manager's
create path (a fresh init, or a CRIU restore for a full checkpoint). Each child learns its
index (DELTABOX_FORK_INDEX, /.deltabox/fork-index); one result, record or error, per child.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Awaitable, Callable

import structlog

from deltabox.core.deltacr import DeltaCR
from deltabox.core.runtime import Runtime, SandboxContext, Standby
from deltabox.core.warm import WarmPools, child_spec
from deltabox.errors import InvalidArgument
from deltabox.faults import crash_point
from deltabox.host.criu import CriuError
from deltabox.store.records import SandboxRecord

__all__ = ["Forks", "auto_name"]

log = structlog.get_logger("deltabox.core.fork")

# (image, name, spec, checkpoint id, images to restore or None, fork index) -> the record
CreateFrom = Callable[..., Awaitable[SandboxRecord]]


def auto_name() -> str:
    return "s-" + secrets.token_hex(6)


class Forks:
    def __init__(self, ctx: SandboxContext, deltacr: DeltaCR, pools: WarmPools,
                 create_from: CreateFrom) -> None:
        self._ctx = ctx
        self._deltacr = deltacr
        self._pools = pools
        self._create_from = create_from

    async def fork(self, checkpoint_id: str, n: int) -> list[SandboxRecord | Exception]:
        """n new sandboxes from a checkpoint (see `_fork`); a deletion of the checkpoint
        waits until they are up."""
        async with self._ctx.holds.hold(checkpoint_id):
            return await self._fork(checkpoint_id, n)

    async def _fork(self, checkpoint_id: str, n: int) -> list[SandboxRecord | Exception]:
        """n new sandboxes from a checkpoint; one result (record or error) per child.

        Warm incarnations (see `warm`) are adopted first, the rest start cold
        (a fresh init, or a CRIU restore for a full checkpoint)."""
        ctx = self._ctx
        if not isinstance(n, int) or not 1 <= n <= ctx.config.max_fork:
            raise InvalidArgument(f"n must be between 1 and {ctx.config.max_fork}")
        ckpt = ctx.store.get_checkpoint(checkpoint_id)
        self._deltacr.refuse_unusable(ckpt)
        spec = child_spec(ckpt)
        warm = self._pools.take(ckpt.id, n)

        async def cold(i: int) -> SandboxRecord:
            name = auto_name()
            child = dict(spec, env={**spec.get("env", {}), "DELTABOX_FORK_INDEX": str(i)})
            return await self._create_from(ckpt.image, name, child, ckpt.id,
                                           self._deltacr.images_for(ckpt), i)

        async def adopt(i: int, sb: Standby) -> SandboxRecord:
            name = auto_name()
            child = dict(spec, env={**spec.get("env", {}), "DELTABOX_FORK_INDEX": str(i)})
            rec = await asyncio.to_thread(ctx.store.adopt_sandbox, name, ckpt.image, child,
                                          ckpt.id, sb.branch_id, ckpt.mount_layers,
                                          sb.init_pid, sb.init_start)
            rt = Runtime(sb.init_pid, sb.branch_id)
            ctx.runtimes[rec.id] = rt
            crash_point("fork.adopted")
            await self._deltacr.wake_child(ckpt, rt, i)
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
            self._deltacr.after_restore_failure(shell, ckpt, failed)
        ctx.metrics.forked.labels("warm").inc(len(warm))
        ctx.metrics.forked.labels("cold").inc(n - len(warm))
        log.info("checkpoint.forked", checkpoint=ckpt.id, n=n, warm=len(warm),
                 failed=sum(isinstance(r, Exception) for r in results))
        return list(results)  # type: ignore[arg-type]
