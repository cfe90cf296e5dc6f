"""The DeltaBox daemon: grpc.aio servicers over the domain layer, and its lifecycle.

Servicers are thin: they turn requests into domain calls and results into
replies. Domain errors become gRPC status codes in one place,
`ErrorInterceptor`, which also times every RPC for the metrics.

Lifecycle: mount the store -> reconcile -> serve (health SERVING, sd_notify
READY=1) -> on SIGTERM/SIGINT: NOT_SERVING, stop accepting calls, let running
ones finish (grace), stop sandboxes, unmount, close the store.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import grp
import hmac
import math
import os
import secrets
import signal
import socket
import sqlite3
import time
import traceback
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deltabox import __version__
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc
from deltabox.host.cgroups import detect_driver
from deltabox.config import CRIU_PREFIX, Config
from deltabox.server.convert import (FILE_TYPE_PB, NETWORK_FROM_PB, SESSION_KIND_FROM_PB,
                              SESSION_KIND_PB, image_pb, sandbox_pb)
from deltabox.errors import (ERROR_METADATA_KEY, DeltaboxError, ImageNotFound, InvalidArgument,
                             PermissionDenied, ResourceExhausted, domain_name)
from deltabox.core.images import ImportLimits, import_image
from deltabox.metrics import Metrics
from deltabox.core.sandboxes import ExecEvent, ProcessInfo, SandboxManager
from deltabox.store.space import StoreSpace
from deltabox.store.metadata import Store, ensure_backing, release_backing

__all__ = ["Daemon", "run_daemon"]

log = structlog.get_logger("deltabox.server.app")

PR_SET_CHILD_SUBREAPER = 36


# ---- errors and metrics, in one place ------------------------------------------------------

# gRPC carries a status message in a trailer, percent-encoded; the client drops a call
# whose trailers pass its metadata limit (8 KiB by default) and reports RESOURCE_EXHAUSTED
# "Stream removed" instead. So a message (which may echo user input) is capped, in UTF-8
# bytes: at most 3 KiB once percent-encoded.
MAX_ERROR_MESSAGE_BYTES = 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def cap_message(message: str, limit: int = MAX_ERROR_MESSAGE_BYTES) -> str:
    """`message`, its middle cut out if it is longer than `limit` UTF-8 bytes: the head
    names what failed, the tail often says why."""
    raw = message.encode("utf-8", "backslashreplace")  # lone surrogates: as \udcff
    if len(raw) <= limit:
        return raw.decode()
    head = raw[:limit * 2 // 3].decode("utf-8", "ignore")
    tail = raw[len(raw) - limit // 4:].decode("utf-8", "ignore")
    return f"{head}...[{len(raw) - len(head.encode()) - len(tail.encode())} bytes cut]...{tail}"


def _out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, is the store
    (or a disk limit) running out of blocks or inodes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) == 13
                                               or "disk is full" in str(exc)):
            return True  # SQLITE_FULL
        if os.strerror(errno.ENOSPC) in str(exc):
            return True  # a helper's (CRIU's, the init's) report, wrapped
        exc = exc.__cause__ or exc.__context__
    return False


def _subject(request) -> str:
    """What a request is about, for messages: its sandbox, checkpoint or name."""
    for field in ("sandbox", "checkpoint", "name"):
        value = getattr(request, field, "")
        if isinstance(value, str) and value:
            return f" of {field} {cap_message(repr(value), 100)}"
    return ""


class ErrorReporter:
    """Turns any exception raised by a call into (status code, message).

    - A `DeltaboxError` travels as its own code.
    - The store (or a disk limit) out of space is RESOURCE_EXHAUSTED, whatever raised it.
    - Anything else is a daemon bug: INTERNAL, with an error id that is also logged, with
      the traceback, so the report can be found in the log. (A ValueError is no
      exception: validation raises `InvalidArgument` explicitly.)
    Messages never show the store's host paths, and are capped in length.
    """

    def __init__(self, space=None, host_paths: tuple[Path, ...] = ()):
        self.space = space
        paths = {str(p) for p in host_paths} | {str(p.resolve()) for p in host_paths}
        self._host_paths = sorted((p for p in paths if p not in ("", "/")), key=len,
                                  reverse=True)

    def status(self, exc: BaseException, method: str,
               request=None) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, DeltaboxError) and exc.code != "INTERNAL":
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)
            message = exc.message
        elif _out_of_space(exc):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            what = f"{method}{_subject(request)}"
            message = self.space.full_message(what) if self.space else \
                f"{what} failed: no space left in the store"
            log.warning("rpc.store_full", method=method, error=self.scrub(str(exc)))
        else:
            code = grpc.StatusCode.INTERNAL
            error_id = secrets.token_hex(4)
            text = exc.message if isinstance(exc, DeltaboxError) else \
                f"{type(exc).__name__}: {exc}"
            message = (f"internal error in {method} (error id {error_id}; the daemon's log "
                       f"has the details): {self.scrub(text)}")
            log.error("rpc.internal_error", error_id=error_id, method=method,
                      error=f"{type(exc).__name__}: {exc}",
                      traceback="".join(traceback.format_exception(exc)))
        return code, cap_message(self.scrub(message))

    def scrub(self, message: str) -> str:
        """`message` without the store's host paths (they tell a client about the host)."""
        for path in self._host_paths:
            message = message.replace(path, "<store>")
        return message


def _parse_request(deserialize, raw, method: str):
    if deserialize is None or not isinstance(raw, bytes):
        return raw
    try:
        return deserialize(raw)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or invalid UTF-8
        raise InvalidArgument(f"malformed {method} request: it does not parse as the "
                              f"method's protobuf message ({type(e).__name__})") from None


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Parses requests, maps errors to status codes (`ErrorReporter`), times each RPC,
    checks the TCP token."""

    def __init__(self, metrics: Metrics, token: str | None, reporter: ErrorReporter | None = None):
        self.metrics = metrics
        self.reporter = reporter or ErrorReporter()
        self.expected_authorization = None if token is None else f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        metrics, expected, reporter = self.metrics, self.expected_authorization, self.reporter
        # Requests arrive as bytes and are parsed here: a malformed one is then an
        # INVALID_ARGUMENT of ours, not gRPC's UNKNOWN "Exception deserializing request".
        deserialize = handler.request_deserializer

        async def fail(context, exc: BaseException, started: float, request=None):
            code, message = reporter.status(exc, method, request)
            metrics.observe(method, code.name, time.monotonic() - started)
            if code != grpc.StatusCode.INTERNAL and (domain := domain_name(exc)):
                context.set_trailing_metadata(((ERROR_METADATA_KEY, domain),))
            await context.abort(code, message)

        def check_token(context):
            if expected is None or (context.peer() or "").startswith("unix:"):
                return  # the unix socket is guarded by its file mode
            sent = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
            # One header, compared in constant time: timing must not reveal a prefix.
            # Missing, repeated, malformed or wrong: the same answer.
            got = sent[0] if len(sent) == 1 else b""
            if isinstance(got, str):
                got = got.encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, expected):
                raise PermissionDenied("missing or wrong bearer token")

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(raw, context):
                started = time.monotonic()
                request = None
                try:
                    check_token(context)
                    request = _parse_request(deserialize, raw, method)
                    reply = await inner_uu(request, context)
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await fail(context, e, started, request)
                metrics.observe(method, "OK", time.monotonic() - started)
                return reply
            return handler._replace(unary_unary=unary_unary, request_deserializer=None)

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(raw, context):
                started = time.monotonic()
                request = None
                try:
                    check_token(context)
                    request = _parse_request(deserialize, raw, method)
                    async for item in inner_us(request, context):
                        yield item
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await fail(context, e, started, request)
                metrics.observe(method, "OK", time.monotonic() - started)
            return handler._replace(unary_stream=unary_stream, request_deserializer=None)

        inner_ss = handler.stream_stream
        if inner_ss is None:
            return handler

        async def parsed(raw_iterator):
            async for raw in raw_iterator:
                yield _parse_request(deserialize, raw, method)

        async def stream_stream(raw_iterator, context):
            started = time.monotonic()
            try:
                check_token(context)
                async for item in inner_ss(parsed(raw_iterator), context):
                    yield item
            except Exception as e:  # noqa: BLE001 - every error becomes a status
                await fail(context, e, started)
            metrics.observe(method, "OK", time.monotonic() - started)
        return handler._replace(stream_stream=stream_stream, request_deserializer=None)


# ---- servicers -----------------------------------------------------------------------------

def _exec_event_pb(ev: ExecEvent) -> pb.ExecEvent:
    if ev.kind == "started":
        return pb.ExecEvent(started=pb.ExecStarted(pid=ev.pid))
    if ev.kind == "stdout":
        return pb.ExecEvent(stdout=ev.data)
    if ev.kind == "stderr":
        return pb.ExecEvent(stderr=ev.data)
    return pb.ExecEvent(exit=_exit_pb(ev))


def _process_pb(sandbox_id: str, p: ProcessInfo) -> pb.Process:
    return pb.Process(sandbox_id=sandbox_id, id=p.id, pid=p.pid, command=p.command,
                      running=p.running, exit_code=p.exit_code, signal=p.signal,
                      stdout_bytes=p.stdout_bytes, stderr_bytes=p.stderr_bytes)


def _exit_pb(ev: ExecEvent) -> pb.ExecExit:
    return pb.ExecExit(exit_code=ev.exit_code, signal=ev.signal, timed_out=ev.timed_out,
                       stdout_truncated=ev.stdout_truncated,
                       stderr_truncated=ev.stderr_truncated, duration_seconds=ev.duration)


class ImagesServicer(pb_grpc.ImagesServicer):
    def __init__(self, daemon: "Daemon"):
        self.d = daemon

    def _import_source(self, source: str) -> Path:
        """The source, resolved, if it lies below one of the daemon's image dirs.
        The daemon runs as root: without this any client could import (and then
        read in a sandbox) /etc/shadow or /root."""
        if not source:
            raise InvalidArgument("source is required: an absolute path below one of the "
                                  "daemon's image directories")
        if "\0" in source:
            raise InvalidArgument(f"source must not contain NUL bytes: {source!r}")
        path = Path(source)
        if not path.is_absolute():
            raise InvalidArgument(f"source must be an absolute path on the daemon's host, "
                                  f"not {source!r}")
        try:
            real = path.resolve(strict=True)
        except OSError:
            raise ImageNotFound(f"image source {source} does not exist") from None
        dirs = self.d.config.image_dirs
        if not any(real.is_relative_to(d.resolve()) for d in dirs):
            raise PermissionDenied(
                f"image source {source} is outside the daemon's image directories "
                f"({', '.join(map(str, dirs))}): copy it there, or start the daemon with "
                "--image-dir")
        return real

    async def ImportImage(self, request, context):
        source = self._import_source(request.source)
        self.d.require_space(f"importing image {request.name!r}", "ImportImage")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def progress(phase: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (phase, done, total))

        job = asyncio.ensure_future(asyncio.to_thread(
            import_image, self.d.store, request.name, source, progress,
            request.replace, ImportLimits.from_config(self.d.config)))
        while not job.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                phase, done, total = getter.result()
                yield pb.ImportImageProgress(phase=phase, done_bytes=done, total_bytes=total)
            else:
                getter.cancel()
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
            yield _exec_event_pb(ev)

    async def ListProcesses(self, request, context):
        rec = self.m.get(request.sandbox)
        procs = await self.m.list_processes(request.sandbox)
        return pb.ListProcessesResponse(processes=[_process_pb(rec.id, p) for p in procs])

    async def GetProcess(self, request, context):
        rec = self.m.get(request.sandbox)
        return _process_pb(rec.id, await self.m.get_process(request.sandbox, request.process))

    async def ProcessLogs(self, request, context):
        async for ev in self.m.process_logs(request.sandbox, request.process, request.follow):
            yield _exec_event_pb(ev)

    async def SignalProcess(self, request, context):
        rec = self.m.get(request.sandbox)
        proc = await self.m.signal_process(request.sandbox, request.process,
                                           int(request.signal or signal.SIGTERM))
        return _process_pb(rec.id, proc)

    async def WaitProcess(self, request, context):
        _check_timeout(request.timeout_seconds)
        rec = self.m.get(request.sandbox)
        proc = await self.m.wait_process(request.sandbox, request.process,
                                         request.timeout_seconds)
        return _process_pb(rec.id, proc)

    async def OpenSession(self, request, context):
        kind = SESSION_KIND_FROM_PB.get(request.kind)
        if kind is None:
            raise InvalidArgument(f"unknown session kind {request.kind}")
        name, pid = await self.m.open_session(request.sandbox, kind, request.name,
                                              dict(request.env), request.cwd)
        rec = self.m.get(request.sandbox)
        return pb.Session(sandbox_id=rec.id, name=name, kind=SESSION_KIND_PB[kind], pid=pid)

    async def RunInSession(self, request, context):
        _check_timeout(request.timeout_seconds)
        res = await self.m.run_in_session(request.sandbox, request.session, request.code,
                                          request.timeout_seconds)
        return pb.RunInSessionResponse(stdout=res.stdout, stderr=res.stderr,
                                       exit_code=res.exit_code, duration_seconds=res.duration)

    async def ListSessions(self, request, context):
        rec = self.m.get(request.sandbox)
        sessions = await self.m.list_sessions(request.sandbox)
        return pb.ListSessionsResponse(sessions=[
            pb.Session(sandbox_id=rec.id, name=n, kind=SESSION_KIND_PB.get(k, 0), pid=p)
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
            async for msg in request_iterator:
                which = msg.WhichOneof("input")
                if which == "stdin":
                    yield "stdin", msg.stdin
                elif which == "resize":
                    _check_window(msg.resize.rows, msg.resize.cols)
                    yield "resize", (msg.resize.rows, msg.resize.cols)

        async for ev in self.m.shell(start.sandbox, list(start.argv), dict(start.env),
                                     start.rows, start.cols, inputs()):
            if ev.kind == "exit":
                yield pb.ShellOutput(exit=_exit_pb(ev))
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
        return pb.ListDirResponse(entries=[_file_info_pb(e) for e in entries])

    async def StatPath(self, request, context):
        files = self.m.files(request.sandbox)
        return _file_info_pb(await asyncio.to_thread(files.stat, request.path))

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


def _printable(path: str) -> str:
    """A file name for a protobuf string: bytes that are not UTF-8 (surrogate-escaped
    by Python) become backslash escapes (\\xff)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _file_info_pb(info) -> pb.FileInfo:
    return pb.FileInfo(path=_printable(info.path), name=_printable(info.name),
                       type=FILE_TYPE_PB[info.type],
                       size=info.size, mode=info.mode, uid=info.uid, gid=info.gid,
                       mtime=info.mtime, link_target=info.link_target)


_MODE_PB = {"fs": pb.CHECKPOINT_MODE_FS, "full": pb.CHECKPOINT_MODE_FULL}
_MODE_FROM_PB = {pb.CHECKPOINT_MODE_UNSPECIFIED: "fs", pb.CHECKPOINT_MODE_FS: "fs",
                 pb.CHECKPOINT_MODE_FULL: "full"}


def _checkpoint_pb(c, ready: bool = False) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(ready=ready,
        id=c.id, sandbox_id=c.sandbox_id, parent_id=c.parent_id, label=c.label,
        mode=_MODE_PB.get(c.mode, 0), created_at=c.created_at, layer_ids=list(c.mount_layers),
        pinned=c.pinned, timings_ms={k: float(v) for k, v in c.stats.items()
                                     if k.endswith("_ms")},
        image_bytes=int(c.stats.get("image_bytes", 0)),
        image_shared_bytes=int(c.stats.get("shared_bytes", 0)),
        layer_bytes=int(c.stats.get("cloned_bytes", 0)),
        restorable=c.restorable, unusable_reason=c.unusable_reason)


class CheckpointsServicer(pb_grpc.CheckpointsServicer):
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.m = daemon.manager

    async def Checkpoint(self, request, context):
        mode = _MODE_FROM_PB.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"unknown checkpoint mode {request.mode}")
        self.m.get(request.sandbox)  # an unknown sandbox is NOT_FOUND, full store or not
        self.d.require_space(f"a checkpoint of sandbox {request.sandbox!r}", "Checkpoint")
        ckpt = await self.m.checkpoint(request.sandbox, request.label, mode,
                                       request.wait_ready)
        return _checkpoint_pb(ckpt, self.m.ready(ckpt.id))

    async def Rollback(self, request, context):
        rec, path, timings = await self.m.rollback(request.sandbox, request.checkpoint)
        return pb.RollbackResponse(sandbox=sandbox_pb(rec), path=path, timings_ms=timings)

    async def Fork(self, request, context):
        t0 = time.perf_counter()
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
            _checkpoint_pb(c, self.m.ready(c.id))
            for c in self.m.list_checkpoints(request.sandbox)])

    async def Diff(self, request, context):
        entries = await self.m.diff(getattr(request, "from"), request.to)
        return pb.DiffResponse(entries=[pb.DiffEntry(path=_printable("/" + p), change=c)
                                        for p, c in entries])

    async def DeleteCheckpoint(self, request, context):
        await self.m.delete_checkpoint(request.checkpoint, request.cascade)
        return pb.DeleteCheckpointResponse()

    async def PinCheckpoint(self, request, context):
        ckpt = self.m.pin_checkpoint(request.checkpoint, request.pinned)
        return _checkpoint_pb(ckpt, self.m.ready(ckpt.id))


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


# ---- lifecycle -----------------------------------------------------------------------------

def _criu_version() -> str:
    criu = CRIU_PREFIX / "sbin" / "criu"
    if not criu.exists():
        return ""
    import subprocess
    res = subprocess.run([str(criu), "--version"], capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return res.stdout.strip()


def _sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify), without libsystemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def _socket_group_id(spec: str | None) -> int | None:
    """The gid of --socket-group (a name or a number), which must exist."""
    if spec is None:
        return None
    try:
        return grp.getgrgid(int(spec)).gr_gid if spec.isdigit() else grp.getgrnam(spec).gr_gid
    except (KeyError, OverflowError):
        raise SystemExit(f"--socket-group {spec}: no such group (create it with "
                         f"`groupadd {spec}`, or give an existing name or gid)") from None


def _own_socket_dir(sock: Path, gid: int, state_dir: Path) -> None:
    """Make the socket's directory root:`gid` 0750: members of the group reach the socket
    (0660), others cannot even traverse. Since its group and mode change, the directory
    must be the socket's own: created now, or holding nothing but a stale socket."""
    parent = sock.absolute().parent
    real, state = parent.resolve(), state_dir.resolve()
    if real == state or state in real.parents or real in state.parents:
        raise SystemExit(f"--socket-group: the socket's directory {parent} must be apart "
                         f"from the state dir {state} (which only root may enter)")
    parent.parent.mkdir(parents=True, exist_ok=True)
    try:
        parent.mkdir(mode=0o750)
    except FileExistsError:
        sock.unlink(missing_ok=True)
        # (a symlink or a non-directory is refused by the open below)
        others = sorted(p.name for p in parent.iterdir()) \
            if parent.is_dir() and not parent.is_symlink() else []
        if others:
            raise SystemExit(f"--socket-group: {parent} holds other files "
                             f"({', '.join(others[:5])}); give the socket a directory of its "
                             "own") from None
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SystemExit(f"--socket-group: cannot open {parent}: {e.strerror}") from None
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, 0o750)
    finally:
        os.close(fd)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.criu_version = ""

    async def start(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("deltabox daemon must run as root (it mounts, creates "
                             "namespaces and cgroups)")
        self._check_tcp_config()  # refuse bad flags before touching anything
        self.socket_gid = _socket_group_id(self.config.socket_group)
        if self.socket_gid is not None:
            _own_socket_dir(self.config.socket, self.socket_gid, self.config.state_dir)
        # Orphaned sandbox inits are re-parented to us, so we can reap them.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.backing = await asyncio.to_thread(ensure_backing, self.config.state_dir,
                                               self.config.store_size)
        self.store = self.manager = None
        try:
            await self._start_serving()
        except BaseException:
            # Leave nothing behind: sandboxes reconcile restarted, mounts, the loop.
            if self.manager is not None:
                await self.manager.shutdown()
            if self.store is not None:
                self.store.close()
            await asyncio.to_thread(release_backing, self.backing)
            raise

    def require_space(self, what: str, method: str) -> None:
        """Refuse new work while the store is below its reserve (`deltabox.store.space`). Only
        calls that start new work are refused: deletions, rollbacks (they drop an upper)
        and the daemon's own work (standbys, squashes) go on."""
        try:
            self.space.require(what)
        except ResourceExhausted:
            self.metrics.store_refusals.labels(method).inc()
            raise

    def _check_tcp_config(self) -> None:
        cfg = self.config
        if cfg.tcp_address and not (cfg.tls_cert and cfg.tls_key and cfg.token):
            raise SystemExit("TCP needs --tls-cert, --tls-key and a bearer token (--token-file "
                             "or $DELTABOX_TOKEN); there is no plaintext TCP")

    async def _start_serving(self) -> None:
        self.store = Store(self.backing.root, durable=self.config.durable)
        self.space = StoreSpace(self.backing.root, self.config.store_reserve,
                                self.config.store_reserve_inodes)
        self.metrics.track_store(self.space)
        self.reporter = ErrorReporter(self.space, (self.config.state_dir, self.backing.root))
        self.manager = SandboxManager(self.config, self.store,
                                      detect_driver(self.store.instance_id), self.metrics)
        report = await self.manager.start()
        self.criu_version = await asyncio.to_thread(_criu_version)

        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.metrics, self.config.token, self.reporter)],
            options=opts)
        pb_grpc.add_ImagesServicer_to_server(ImagesServicer(self), self.server)
        pb_grpc.add_SandboxesServicer_to_server(SandboxesServicer(self), self.server)
        pb_grpc.add_CheckpointsServicer_to_server(CheckpointsServicer(self), self.server)
        pb_grpc.add_SystemServicer_to_server(SystemServicer(self), self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else \
            health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [d.full_name for d in pb.DESCRIPTOR.services_by_name.values()]
        reflection.enable_server_reflection(names + [health.SERVICE_NAME,
                                                     reflection.SERVICE_NAME], self.server)

        sock = self.config.socket
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        self.server.add_insecure_port(f"unix:{sock}")
        if self.config.tcp_address:
            self._add_tcp_port(opts)
        await self.server.start()
        if self.socket_gid is not None:
            os.chown(sock, 0, self.socket_gid)
        os.chmod(sock, 0o660)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        _sd_notify("READY=1")
        log.info("daemon.serving", socket=str(sock), state_dir=str(self.config.state_dir),
                 store=self.backing.kind, criu=self.criu_version,
                 disk_quotas=self.store.quotas.state, **report)
        if not self.store.quotas.enforced and self.config.default_disk_bytes:
            log.warning("daemon.disk_limits_not_enforced", reason=self.store.quotas.state)

    def _add_tcp_port(self, opts) -> None:
        cfg = self.config
        creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(),
                                              cfg.tls_cert.read_bytes())])
        # Calls arriving over TCP must carry the bearer token (see ErrorInterceptor).
        self.server.add_secure_port(cfg.tcp_address, creds)
        log.warning("daemon.tcp_enabled", address=cfg.tcp_address)

    async def _set_health(self, status) -> None:
        for service in ("", *[d.full_name for d in pb.DESCRIPTOR.services_by_name.values()]):
            res = self.health.set(service, status)
            if asyncio.iscoroutine(res):
                await res

    async def stop(self, grace: float = 5.0) -> None:
        log.info("daemon.stopping")
        _sd_notify("STOPPING=1")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        try:
            await self.manager.shutdown()
        finally:  # whatever failed above, the store is not left mounted
            self.store.close()
            await asyncio.to_thread(release_backing, self.backing)
            self.config.socket.unlink(missing_ok=True)
        log.info("daemon.stopped")


async def _serve(config: Config) -> None:
    daemon = Daemon(config)
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await daemon.stop()


def run_daemon(config: Config) -> None:
    from deltabox.logs import configure_logging
    configure_logging()
    asyncio.run(_serve(config))
