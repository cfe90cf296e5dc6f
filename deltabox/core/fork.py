"""Fork: n new sandboxes from one checkpoint.

Warm incarnations (`deltabox.core.warm`, re-seeded while they wait) are adopted first --
recorded as new sandboxes, told their index and woken -- and the rest start cold through
the manager's create path (a fresh init, or a CRIU restore for a full checkpoint), beside
the adoptions. Each child learns its index (DELTABOX_FORK_INDEX, /.deltabox/fork-index);
one result, record or error, per child.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Awaitable, Callable

import structlog

from deltabox.core.deltacr import DeltaCR
from deltabox.core.runtime import Runtime, SandboxContext, Standby
from deltabox.core.warm import WarmPools, child_spec
from deltabox.errors import InvalidArgument
from deltabox.faults import crash_point
from deltabox.host.criu import CriuError
from deltabox.store.records import SandboxRecord
from deltabox.types import CheckpointMode

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

        cold_jobs = asyncio.gather(*(cold(i) for i in range(len(warm), n)),
                                   return_exceptions=True)  # running beside the adoptions
        adopted, timings = await self._adopt(ckpt, spec, warm)
        results = adopted + list(await cold_jobs)
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
                 **timings,
                 failed=sum(isinstance(r, Exception) for r in results))
        return list(results)  # type: ignore[arg-type]

    async def _adopt(self, ckpt, spec: dict, warm: list[Standby]) -> tuple[list, dict]:
        """Warm incarnations become children 0..len(warm)-1: recorded (one transaction
        each, all in one worker-thread pass: no thread hop per child), then each told its
        index and thawed in a second pass -- their Python sessions were re-seeded while
        they waited in the pool, so no call into a child is on this path. One result,
        record or error, per child, and the ms each phase took."""
        ctx = self._ctx
        t0 = time.perf_counter()

        def record_all() -> list:
            out: list = []
            for i, sb in enumerate(warm):
                child = dict(spec, env={**spec.get("env", {}), "DELTABOX_FORK_INDEX": str(i)})
                try:
                    out.append(ctx.store.adopt_sandbox(auto_name(), ckpt.image, child, ckpt.id,
                                                       sb.branch_id, ckpt.mount_layers,
                                                       sb.init_pid, sb.init_start))
                except Exception as e:  # noqa: BLE001 - that child's result
                    out.append(e)
            return out

        full = ckpt.mode == CheckpointMode.FULL

        def wake_all(runtimes: list) -> list:
            out: list = []
            for i, rt in enumerate(runtimes):
                try:
                    if rt is not None and full:
                        # Its sessions were re-seeded while it waited (DeltaCR.seed_ahead).
                        self._deltacr.write_fork_index(rt.branch_id, i)
                        self._deltacr.wake(ckpt, rt.branch_id)
                    out.append(None)
                except Exception as e:  # noqa: BLE001 - that child's result
                    out.append(e)
            return out

        results = await asyncio.to_thread(record_all) if warm else []
        t1 = time.perf_counter()
        runtimes: list[Runtime | None] = []
        for rec, sb in zip(results, warm):
            if isinstance(rec, Exception):
                runtimes.append(None)
                continue
            rt = Runtime(sb.init_pid, sb.branch_id)
            ctx.runtimes[rec.id] = rt
            runtimes.append(rt)
        if any(rt is not None for rt in runtimes):
            crash_point("fork.adopted")
        woken = await asyncio.to_thread(wake_all, runtimes) if warm else []
        t2 = time.perf_counter()
        timings = {"record_ms": round(1000 * (t1 - t0), 1),
                   "wake_ms": round(1000 * (t2 - t1), 1)} if warm else {}
        return [rec if isinstance(rec, Exception) else (err or rec)
                for rec, err in zip(results, woken)], timings
