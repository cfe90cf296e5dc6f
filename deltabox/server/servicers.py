"""The gRPC servicers: each method turns its request into a domain call and the result into
its reply, nothing more.

The domain layer (`deltabox.core`) decides; conversions live in `deltabox.server.convert`;
errors become status codes in `deltabox.server.interceptors`. What is left here is the
checking of request fields that only exist on the wire (a terminal size, a timeout that must
be finite, argv or shell). Where ImportImage may read from is `deltabox.core.images`' rule
(`resolve_import_source`).
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from typing import TYPE_CHECKING

from deltabox import __version__
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc
from deltabox.core.image_layers import ImportLimits
from deltabox.core.images import import_image, resolve_import_source
from deltabox.errors import FailedPrecondition, InvalidArgument
from deltabox.server.convert import (MODE_FROM_PB, NETWORK_FROM_PB, SESSION_KIND_FROM_PB,
                                     checkpoint_pb, diff_entry_pb, exec_event_pb, exit_pb,
                                     file_info_pb, image_pb, process_pb, rollback_pb,
                                     sandbox_pb, session_pb, session_result_pb)

if TYPE_CHECKING:
    from deltabox.server.app import Daemon

__all__ = ["ImagesServicer", "SandboxesServicer", "CheckpointsServicer", "SystemServicer"]


class ImagesServicer(pb_grpc.ImagesServicer):
    def __init__(self, daemon: "Daemon"):
        self.d = daemon

    async def ImportImage(self, request, context):
        source = resolve_import_source(request.source, self.d.config.image_dirs)
        self.d.require_space(f"importing image {request.name!r}", "ImportImage")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def progress(phase: str, done: int, total: int) -> None:
            # Called by the import as it goes, and last just before it commits: a caller
            # gone (cancelled, deadline) stops it there, and it removes what it wrote.
            if cancelled.is_set():
                raise FailedPrecondition(f"the import of image {request.name!r} was "
                                         "cancelled by its caller")
            loop.call_soon_threadsafe(queue.put_nowait, (phase, done, total))

        job = asyncio.ensure_future(asyncio.to_thread(
            import_image, self.d.store, request.name, source, progress,
            request.replace, ImportLimits.from_config(self.d.config)))
        job.add_done_callback(lambda t: t.cancelled() or t.exception())  # a caller gone
        try:
            while not job.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    phase, done, total = getter.result()
                    yield pb.ImportImageProgress(phase=phase, done_bytes=done,
                                                 total_bytes=total)
                else:
                    getter.cancel()
        finally:
            if not job.done():
                cancelled.set()
        yield pb.ImportImageProgress(phase="done", image=image_pb(job.result()))

    async def ListImages(self, request, context):
        images = await asyncio.to_thread(self.d.store.list_images)
        return pb.ListImagesResponse(images=[image_pb(i) for i in images])

    async def RemoveImage(self, request, context):
        await asyncio.to_thread(self.d.store.remove_image, request.name)
        return pb.RemoveImageResponse()


class SandboxesServicer(pb_grpc.SandboxesServicer):
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.m = daemon.manager

    async def CreateSandbox(self, request, context):
        if not request.image:
            raise InvalidArgument("image is required")
        self.d.require_space("creating a sandbox", "CreateSandbox")
        rec = await self.m.create(
            request.image, request.name, request.limits.memory_bytes, request.limits.pids,
            request.limits.cpus, NETWORK_FROM_PB.get(request.network, "invalid"),
            dict(request.env), request.hostname, disk_bytes=request.limits.disk_bytes,
            disk_inodes=request.limits.disk_inodes)
        return sandbox_pb(rec)

    async def GetSandbox(self, request, context):
        return sandbox_pb(self.m.get(request.sandbox))

    async def ListSandboxes(self, request, context):
        return pb.ListSandboxesResponse(sandboxes=[sandbox_pb(r) for r in self.m.list()])

    async def DestroySandbox(self, request, context):
        await self.m.destroy(request.sandbox)
        return pb.DestroySandboxResponse()

    async def Exec(self, request, context):
        argv = list(request.argv)
        if request.shell:
            if argv:
                raise InvalidArgument("set either argv or shell, not both")
            argv = ["/bin/sh", "-c", request.shell]
        _check_timeout(request.timeout_seconds)
        if request.detach:
            if request.timeout_seconds or request.max_output_bytes:
                raise InvalidArgument("timeout_seconds and max_output_bytes do not apply to a "
                                      "detached exec (WaitProcess takes a timeout)")
            proc = await self.m.exec_detached(request.sandbox, argv, dict(request.env),
                                              request.cwd, request.stdin)
            yield pb.ExecEvent(started=pb.ExecStarted(pid=proc.pid, process=proc.id))
            return
        async for ev in self.m.exec(request.sandbox, argv, dict(request.env), request.cwd,
                                    request.stdin, request.timeout_seconds,
                                    request.max_output_bytes):
            yield exec_event_pb(ev)

    async def ExecMany(self, request, context):
        return await self.d.batch.exec_many(request, context)  # deltabox.server.batch

    async def ListProcesses(self, request, context):
        rec = self.m.get(request.sandbox)
        procs = await self.m.list_processes(request.sandbox)
        return pb.ListProcessesResponse(processes=[process_pb(rec.id, p) for p in procs])

    async def GetProcess(self, request, context):
        rec = self.m.get(request.sandbox)
        return process_pb(rec.id, await self.m.get_process(request.sandbox, request.process))

    async def ProcessLogs(self, request, context):
        async for ev in self.m.process_logs(request.sandbox, request.process, request.follow):
            yield exec_event_pb(ev)

    async def SignalProcess(self, request, context):
        rec = self.m.get(request.sandbox)
        proc = await self.m.signal_process(request.sandbox, request.process,
                                           int(request.signal or signal.SIGTERM))
        return process_pb(rec.id, proc)

    async def WaitProcess(self, request, context):
        _check_timeout(request.timeout_seconds)
        rec = self.m.get(request.sandbox)
        proc = await self.m.wait_process(request.sandbox, request.process,
                                         request.timeout_seconds)
        return process_pb(rec.id, proc)

    async def OpenSession(self, request, context):
        kind = SESSION_KIND_FROM_PB.get(request.kind)
        if kind is None:
            raise InvalidArgument(f"unknown session kind {request.kind}")
        name, pid = await self.m.open_session(request.sandbox, kind, request.name,
                                              dict(request.env), request.cwd)
        rec = self.m.get(request.sandbox)
        return session_pb(rec.id, name, kind, pid)

    async def RunInSession(self, request, context):
        _check_timeout(request.timeout_seconds)
        res = await self.m.run_in_session(request.sandbox, request.session, request.code,
                                          request.timeout_seconds)
        return session_result_pb(res)

    async def ListSessions(self, request, context):
        rec = self.m.get(request.sandbox)
        sessions = await self.m.list_sessions(request.sandbox)
        return pb.ListSessionsResponse(sessions=[
            session_pb(rec.id, n, k, p)
            for n, k, p in sessions])

    async def CloseSession(self, request, context):
        await self.m.close_session(request.sandbox, request.session)
        return pb.CloseSessionResponse()

    async def Shell(self, request_iterator, context):
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            first = None
        if first is None or first.WhichOneof("input") != "start":
            raise InvalidArgument("the first Shell message must be `start`")
        start = first.start
        _check_window(start.rows, start.cols)

        async def inputs():
            messages = request_iterator.__aiter__()
            while True:
                try:
                    msg = await messages.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as e:  # noqa: BLE001 - a message gRPC could not parse
                    raise InvalidArgument(f"a Shell message could not be read: {e}") from None
                which = msg.WhichOneof("input")
                if which == "stdin":
                    yield "stdin", msg.stdin
                elif which == "resize":
                    _check_window(msg.resize.rows, msg.resize.cols)
                    yield "resize", (msg.resize.rows, msg.resize.cols)

        async for ev in self.m.shell(start.sandbox, list(start.argv), dict(start.env),
                                     start.rows, start.cols, inputs()):
            if ev.kind == "exit":
                yield pb.ShellOutput(exit=exit_pb(ev))
            else:
                yield pb.ShellOutput(data=ev.data)

    # files: blocking syscalls, so each runs in a worker thread
    async def ReadFile(self, request, context):
        files = self.m.files(request.sandbox)
        data, size = await asyncio.to_thread(files.read, request.path, request.offset,
                                             request.length)
        return pb.ReadFileResponse(data=data, file_size=size)

    async def WriteFile(self, request, context):
        files = self.m.files(request.sandbox)
        size = await asyncio.to_thread(files.write, request.path, request.data, request.mode,
                                       request.append, request.make_parents)
        return pb.WriteFileResponse(size=size)

    async def ListDir(self, request, context):
        files = self.m.files(request.sandbox)
        entries = await asyncio.to_thread(files.list, request.path or "/")
        return pb.ListDirResponse(entries=[file_info_pb(e) for e in entries])

    async def StatPath(self, request, context):
        files = self.m.files(request.sandbox)
        return file_info_pb(await asyncio.to_thread(files.stat, request.path))

    async def RemovePath(self, request, context):
        files = self.m.files(request.sandbox)
        await asyncio.to_thread(files.remove, request.path, request.recursive)
        return pb.RemovePathResponse()

    async def MakeDir(self, request, context):
        files = self.m.files(request.sandbox)
        await asyncio.to_thread(files.mkdir, request.path, request.parents,
                                request.mode or 0o755)
        return pb.MakeDirResponse()

def _check_timeout(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InvalidArgument(f"timeout_seconds must be a finite number >= 0 (0 = none), "
                              f"not {seconds}")


def _check_window(rows: int, cols: int) -> None:
    if rows > 0xFFFF or cols > 0xFFFF:
        raise InvalidArgument(f"a terminal window of {rows}x{cols}: rows and cols must be "
                              "at most 65535")

class CheckpointsServicer(pb_grpc.CheckpointsServicer):
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.m = daemon.manager

    async def Checkpoint(self, request, context):
        mode = MODE_FROM_PB.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"unknown checkpoint mode {request.mode}")
        self.m.get(request.sandbox)  # an unknown sandbox is NOT_FOUND, full store or not
        self.d.require_space(f"a checkpoint of sandbox {request.sandbox!r}", "Checkpoint")
        likely = request.rollback_likely if request.HasField("rollback_likely") else None
        ckpt = await self.m.checkpoint(request.sandbox, request.label, mode,
                                       request.wait_ready, likely, request.background)
        return checkpoint_pb(ckpt, self.m.ready(ckpt.id), self.m.pending(ckpt.id))

    async def WaitCheckpoint(self, request, context):
        ckpt = await self.m.wait_checkpoint(request.checkpoint)
        return checkpoint_pb(ckpt, self.m.ready(ckpt.id))

    async def Rollback(self, request, context):
        rec, path, timings = await self.m.rollback(request.sandbox, request.checkpoint)
        return rollback_pb(rec, path, timings)

    async def CheckpointMany(self, request, context):
        return await self.d.batch.checkpoint_many(request, context)  # deltabox.server.batch

    async def RollbackMany(self, request, context):
        return await self.d.batch.rollback_many(request, context)

    async def Fork(self, request, context):
        t0 = time.perf_counter()
        await self.m.settled(request.checkpoint)  # a pending one: recorded first
        self.m.store.get_checkpoint(request.checkpoint)  # NOT_FOUND first
        self.d.require_space(f"forking checkpoint {request.checkpoint!r}", "Fork")
        results = await self.m.fork(request.checkpoint, request.n)
        total_ms = 1000 * (time.perf_counter() - t0)
        out = []
        for r in results:
            if isinstance(r, Exception):
                code, message = self.d.reporter.status(r, "Fork", request)
                out.append(pb.ForkResult(error=message, error_code=code.name))
            else:
                out.append(pb.ForkResult(sandbox=sandbox_pb(r)))
        return pb.ForkResponse(children=out, timings_ms={"total_ms": total_ms})

    async def Warm(self, request, context):
        ready = await self.m.warm(request.checkpoint, request.n, request.wait)
        return pb.WarmResponse(ready=ready)

    async def ListCheckpoints(self, request, context):
        return pb.ListCheckpointsResponse(checkpoints=[
            checkpoint_pb(c, self.m.ready(c.id))
            for c in await self.m.list_checkpoints(request.sandbox)])

    async def Diff(self, request, context):
        entries = await self.m.diff(getattr(request, "from"), request.to)
        return pb.DiffResponse(entries=[diff_entry_pb(p, c) for p, c in entries])

    async def DeleteCheckpoint(self, request, context):
        await self.m.delete_checkpoint(request.checkpoint, request.cascade)
        return pb.DeleteCheckpointResponse()

    async def PinCheckpoint(self, request, context):
        ckpt = await self.m.pin_checkpoint(request.checkpoint, request.pinned)
        return checkpoint_pb(ckpt, self.m.ready(ckpt.id))

    # Moving checkpoints (deltabox.core.transfer): the stream's frames are API messages.
    async def CheckpointManifest(self, request, context):
        return await self.m.checkpoint_manifest(request.checkpoint)

    async def HaveLayers(self, request, context):
        return pb.HaveLayersResponse(have=await self.m.have_layers(list(request.digests)))

    async def ExportCheckpoint(self, request, context):
        await self.m.settled(request.checkpoint)  # a pending one: recorded first
        self.m.store.get_checkpoint(request.checkpoint)  # NOT_FOUND before the stream
        async for chunk in self.m.export_checkpoint(request.checkpoint,
                                                    list(request.skip_layers)):
            yield chunk

    async def ImportCheckpoint(self, request_iterator, context):
        self.d.require_space("importing a checkpoint", "ImportCheckpoint")
        ckpt = await self.m.import_checkpoint(request_iterator)
        return checkpoint_pb(ckpt, self.m.ready(ckpt.id))


class SystemServicer(pb_grpc.SystemServicer):
    def __init__(self, daemon: "Daemon"):
        self.d = daemon

    async def Status(self, request, context):
        space = self.d.space.usage()
        return pb.StatusResponse(
            version=__version__, state_dir=str(self.d.config.state_dir),
            store_backing=self.d.backing.kind, store_size_bytes=space.size_bytes,
            store_free_bytes=space.free_bytes, store_inodes=space.inodes,
            store_free_inodes=space.free_inodes, store_reserve_bytes=space.reserve_bytes,
            store_reserve_inodes=space.reserve_inodes,
            store_below_reserve=space.below_reserve, sandboxes=len(self.d.manager.list()),
            images=len(self.d.store.list_images()), criu_version=self.d.criu_version,
            uptime_seconds=time.monotonic() - self.d.started,
            disk_quotas=self.d.store.quotas.state)

    async def Stats(self, request, context):
        return pb.StatsResponse(
            operations=[pb.OperationStats(operation=m, count=c, p50_ms=p50, p95_ms=p95)
                        for m, c, p50, p95 in self.d.metrics.summary()],
            prometheus_text=self.d.metrics.prometheus_text())
