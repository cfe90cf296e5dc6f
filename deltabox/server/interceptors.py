"""What every RPC goes through before and after its servicer: one place for cross-cutting rules.

- The bearer token on TCP (the unix socket is guarded by its file mode).
- Request parsing: a request that does not parse is our INVALID_ARGUMENT, not gRPC's UNKNOWN.
- Errors -> status: a `DeltaboxError` travels as its own code (and its domain class in the
  trailing metadata, so the client raises the same class); the store out of space is
  RESOURCE_EXHAUSTED whatever raised it; anything else is a daemon bug, INTERNAL with an
  error id that the log has too. Messages are capped and never show the store's host paths.
- Per-RPC metrics: latency and errors by method and code (`deltabox.metrics.Metrics`).
- Work a unary call defers until its reply has left (`deltabox.core.after_reply`) runs
  from gRPC's done callback.
"""

from __future__ import annotations

import errno
import hmac
import os
import secrets
import sqlite3
import time
import traceback
from pathlib import Path

import grpc
import structlog

from deltabox.core.after_reply import Reply
from deltabox.errors import (ERROR_METADATA_KEY, DeltaboxError, InvalidArgument,
                             PermissionDenied, domain_name)
from deltabox.metrics import Metrics

__all__ = ["ErrorInterceptor", "ErrorReporter", "cap_message", "MAX_ERROR_MESSAGE_BYTES"]

log = structlog.get_logger("deltabox.server.interceptors")

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
    - A FileNotFoundError that got this far is NOT_FOUND (a file of the store vanished
      under the call), logged with its traceback like an internal error.
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
        elif isinstance(exc, FileNotFoundError):
            # A file the call needed vanished (a store path: a checkpoint or sandbox deleted
            # under it). Not the client's fault, yet nothing a retry of INTERNAL fixes
            # either: NOT_FOUND, with an id the log has with the traceback.
            code = grpc.StatusCode.NOT_FOUND
            error_id = secrets.token_hex(4)
            message = (f"{method}{_subject(request)} failed: a file it needed is gone (was "
                       f"its checkpoint or sandbox deleted meanwhile?) (error id {error_id}): "
                       f"{self.scrub(str(exc))}")
            log.warning("rpc.file_gone", error_id=error_id, method=method,
                        error=f"{type(exc).__name__}: {exc}",
                        traceback="".join(traceback.format_exception(exc)))
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
                # What the call defers until its reply has left (deltabox.core.after_reply).
                reply_sent = Reply()
                reply_sent.open()
                context.add_done_callback(reply_sent.sent)
                metrics.in_flight.started()  # background builds yield to it
                try:
                    check_token(context)
                    request = _parse_request(deserialize, raw, method)
                    reply = await inner_uu(request, context)
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await fail(context, e, started, request)
                finally:
                    metrics.in_flight.ended()
                metrics.observe(method, "OK", time.monotonic() - started)
                return reply
            return handler._replace(unary_unary=unary_unary, request_deserializer=None)

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(raw, context):
                started = time.monotonic()
                request = None
                metrics.in_flight.started()  # background builds yield to it
                try:
                    check_token(context)
                    request = _parse_request(deserialize, raw, method)
                    async for item in inner_us(request, context):
                        yield item
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await fail(context, e, started, request)
                finally:
                    metrics.in_flight.ended()
                metrics.observe(method, "OK", time.monotonic() - started)
            return handler._replace(unary_stream=unary_stream, request_deserializer=None)

        async def parsed(raw_iterator):
            async for raw in raw_iterator:
                yield _parse_request(deserialize, raw, method)

        if handler.stream_unary:  # ImportCheckpoint: the same token check and statuses
            inner_su = handler.stream_unary

            async def stream_unary(raw_iterator, context):
                started = time.monotonic()
                metrics.in_flight.started()
                try:
                    check_token(context)
                    reply = await inner_su(parsed(raw_iterator), context)
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await fail(context, e, started)
                finally:
                    metrics.in_flight.ended()
                metrics.observe(method, "OK", time.monotonic() - started)
                return reply
            return handler._replace(stream_unary=stream_unary, request_deserializer=None)

        inner_ss = handler.stream_stream
        if inner_ss is None:
            return handler

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
