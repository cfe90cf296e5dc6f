"""Batched calls: CheckpointMany, RollbackMany, ExecMany (the contract is in the .proto).

Each item is its single call, made through that call's own servicer method, so its
validation and effects are exactly the single call's; this module only runs the items
concurrently (bounded), and puts each one's reply or error in its slot. An item's error
becomes what its single call's status would have been (`ErrorReporter`: code, message,
domain name), so the client raises the same class for it. One item failing never fails
the call.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.errors import DeltaboxError, InvalidArgument, ResourceExhausted, domain_name
from deltabox.server.servicers import CheckpointsServicer, SandboxesServicer

if TYPE_CHECKING:
    from deltabox.server.app import Daemon

__all__ = ["BatchRunner", "DEFAULT_CONCURRENCY", "MAX_CONCURRENCY", "MAX_ITEMS"]

DEFAULT_CONCURRENCY = 16
MAX_CONCURRENCY = 64
MAX_ITEMS = 1024


class BatchRunner:
    """Runs the items of a *Many request through the single call's servicer method."""

    def __init__(self, daemon: "Daemon"):
        self.reporter = daemon.reporter
        # What one reply may carry (gRPC's send limit), less room for the message's framing.
        self.reply_bytes = daemon.config.max_message_bytes * 9 // 10
        self.sandboxes = SandboxesServicer(daemon)
        self.checkpoints = CheckpointsServicer(daemon)

    async def checkpoint_many(self, request, context) -> pb.CheckpointManyResponse:
        async def one(item):
            return pb.CheckpointManyResult(
                checkpoint=await self.checkpoints.Checkpoint(item, context))
        results, total_ms = await self._run("Checkpoint", request, one,
                                            pb.CheckpointManyResult)
        return pb.CheckpointManyResponse(results=results, timings_ms={"total_ms": total_ms})

    async def rollback_many(self, request, context) -> pb.RollbackManyResponse:
        async def one(item):
            return pb.RollbackManyResult(rollback=await self.checkpoints.Rollback(item, context))
        results, total_ms = await self._run("Rollback", request, one, pb.RollbackManyResult)
        return pb.RollbackManyResponse(results=results, timings_ms={"total_ms": total_ms})

    async def exec_many(self, request, context) -> pb.ExecManyResponse:
        for i, item in enumerate(request.items):
            if item.detach:
                raise InvalidArgument(f"ExecMany item {i}: detach is not allowed in a batch "
                                      "(start detached execs with Exec)")

        # The outputs are held until the one reply: their sum is bounded by what the reply
        # may carry, not by items x max_output (1024 x 16 MiB would exhaust the daemon's
        # memory before gRPC refused to send it). An item whose output no longer fits
        # fails with RESOURCE_EXHAUSTED in its slot, and lets go of what it held.
        held = [0]

        async def one(item):
            out, err, output, mine = [], [], pb.ExecOutput(), 0
            try:
                async for ev in self.sandboxes.Exec(item, context):
                    kind = ev.WhichOneof("event")
                    if kind in ("stdout", "stderr"):
                        data = getattr(ev, kind)
                        mine += len(data)
                        held[0] += len(data)
                        if held[0] > self.reply_bytes:
                            raise ResourceExhausted(
                                f"the batch's outputs exceed what one reply may carry "
                                f"({self.reply_bytes:,} bytes): ask for less output "
                                "(max_output) or run fewer items per batch")
                        (out if kind == "stdout" else err).append(data)
                    elif kind == "started":
                        output.pid = ev.started.pid
                    elif kind == "exit":
                        output.exit.CopyFrom(ev.exit)
                if not output.HasField("exit"):
                    raise DeltaboxError("the exec's stream ended without an exit status")
            except BaseException:
                held[0] -= mine
                raise
            output.stdout, output.stderr = b"".join(out), b"".join(err)
            return pb.ExecManyResult(output=output)
        results, total_ms = await self._run("Exec", request, one, pb.ExecManyResult)
        return pb.ExecManyResponse(results=results, timings_ms={"total_ms": total_ms})

    async def _run(self, method: str, request, one: Callable[..., Awaitable], result_cls):
        """Each item of `request` through `one`, at most `concurrency` at a time; a failing
        item's slot holds its error. Returns (results in order, total ms)."""
        items = list(request.items)
        if not 1 <= len(items) <= MAX_ITEMS:
            raise InvalidArgument(f"a batch holds 1 to {MAX_ITEMS} items, not {len(items)}")
        limit = request.concurrency or DEFAULT_CONCURRENCY
        if not 1 <= limit <= MAX_CONCURRENCY:
            raise InvalidArgument(f"concurrency must be 0 (the default, "
                                  f"{DEFAULT_CONCURRENCY}) or 1..{MAX_CONCURRENCY}, "
                                  f"not {request.concurrency}")
        started = time.perf_counter()
        gate = asyncio.Semaphore(limit)

        async def guarded(item):
            async with gate:
                try:
                    return await one(item)
                except Exception as e:  # noqa: BLE001 - each item's error goes in its slot
                    code, message = self.reporter.status(e, method, item)
                    domain = domain_name(e) if code.name != "INTERNAL" else ""
                    return result_cls(error=pb.BatchError(code=code.name, message=message,
                                                          domain=domain))
        results = await asyncio.gather(*(guarded(item) for item in items))
        return results, 1000 * (time.perf_counter() - started)
