"""Running things in a sandbox: exec, detached execs (kept processes) and the shell.

Everything that runs in a sandbox is a child of its init, reached over a unix socket
inside the sandbox (`deltabox.host.initproto`), so the whole tree stays inside the
namespaces and the cgroup -- and can be checkpointed later. Attached conversations (an
exec, a followed log, the shell) hold the sandbox's dump gate `busy`; short ones (a
detached spawn, a query, a listing) `control` (see `runtime.DumpGate`). Sessions are in
`deltabox.core.sessions`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import AsyncIterator

import structlog

from deltabox.core.runtime import Runtime, SandboxContext
from deltabox.errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
                             NotFound, ProcessNotFound)
from deltabox.host import initproto
from deltabox.store.records import SandboxRecord, validate_name

__all__ = ["Processes", "ExecEvent", "ProcessInfo", "wait_status", "sandbox_env", "check_env"]

log = structlog.get_logger("deltabox.core.process")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROCESS_PREFIX = "exec/"  # init's name of a detached exec: exec/<process id>
PROCESS_TAIL_BYTES = 1 << 20  # what init keeps of each stream of a detached exec
MAX_DETACHED_STDIN = 1 << 20  # init buffers this much without the process reading it
MAX_ENV_BYTES = 1 << 20


@dataclass
class ExecEvent:
    kind: str  # started | stdout | stderr | exit
    data: bytes = b""
    pid: int = 0
    exit_code: int = 0
    signal: int = 0
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0


@dataclass
class ProcessInfo:
    """A detached exec: a process the sandbox's init keeps a record of (a *kept*
    process, docs/init-protocol.md), named by `id`."""
    id: str
    pid: int
    command: str
    running: bool
    exit_code: int = 0  # once ended; -1 when killed by a signal
    signal: int = 0
    stdout_bytes: int = 0  # everything it wrote; init keeps the newest PROCESS_TAIL_BYTES
    stderr_bytes: int = 0

    @classmethod
    def from_state(cls, process_id: str, st: initproto.ProcessState) -> "ProcessInfo":
        code, sig = wait_status(st.status) if st.status is not None else (0, 0)
        return cls(process_id, st.pid, st.command, st.status is None, code, sig,
                   st.stdout_bytes, st.stderr_bytes)


def wait_status(status: int) -> tuple[int, int]:
    """(exit_code, signal) from a raw wait status; exit_code -1 when signalled."""
    if os.WIFSIGNALED(status):
        return -1, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), 0


def check_env(env: dict) -> None:
    size = 0
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise InvalidArgument(f"invalid environment variable name {k!r}")
        if "\0" in str(v):
            raise InvalidArgument(f"the value of environment variable {k!r} holds a NUL byte")
        size += len(k) + len(str(v))
    if size > MAX_ENV_BYTES:
        raise InvalidArgument("environment too large")


def sandbox_env(rec: SandboxRecord, extra: dict | None) -> dict[str, str]:
    """The environment of a process started in the sandbox: defaults, the sandbox's
    own, then the call's `extra`."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm", "LANG": "C.UTF-8",
           "HOSTNAME": rec.spec["hostname"]}
    env.update(rec.spec.get("env", {}))
    if extra:
        check_env(extra)
        env.update(extra)
    return env


class Processes:
    """exec, detached execs and the shell of running sandboxes."""

    def __init__(self, ctx: SandboxContext) -> None:
        self._ctx = ctx
        self.config = ctx.config

    # ---- exec ------------------------------------------------------------------------

    async def exec(self, ref: str, argv: list[str], env: dict | None = None, cwd: str = "/",
                   stdin: bytes = b"", timeout: float = 0.0,
                   max_output: int = 0) -> AsyncIterator[ExecEvent]:
        """Run argv in the sandbox; yields started, stdout/stderr chunks, then exit."""
        if not argv or not argv[0]:
            raise InvalidArgument("argv must not be empty")
        if timeout < 0 or max_output < 0:
            raise InvalidArgument("timeout and max_output_bytes must be >= 0")
        rec, rt = self._ctx.running(ref)
        max_output = max_output or self.config.max_output_bytes
        async with rt.busy():
            async for ev in self._exec_conversation(rt, rec, argv, env, cwd, stdin, timeout,
                                                    max_output):
                yield ev

    async def _exec_conversation(self, rt: Runtime, rec: SandboxRecord, argv: list[str],
                                 env: dict | None, cwd: str, stdin: bytes, timeout: float,
                                 max_output: int) -> AsyncIterator[ExecEvent]:
        conv, pid = await rt.channel.spawn(argv, sandbox_env(rec, env), cwd or "/")
        started = time.monotonic()
        async with conv:
            yield ExecEvent("started", pid=pid)
            feeder = asyncio.create_task(_feed_stdin(conv, stdin))
            timed_out = False
            timer = None
            if timeout:
                async def expire() -> None:
                    nonlocal timed_out
                    await asyncio.sleep(timeout)
                    timed_out = True
                    await conv.send_signal(signal.SIGKILL)
                timer = asyncio.create_task(expire())
            sizes = {"stdout": 0, "stderr": 0}
            truncated = {"stdout": False, "stderr": False}
            try:
                async for frame in conv.frames():
                    if frame.type in (initproto.STDOUT, initproto.STDERR):
                        stream = "stdout" if frame.type == initproto.STDOUT else "stderr"
                        room = max_output - sizes[stream]
                        data = frame.payload[:room]
                        if len(data) < len(frame.payload):
                            truncated[stream] = True
                        if data:
                            sizes[stream] += len(data)
                            yield ExecEvent(stream, data=data)
                    elif frame.type == initproto.EXIT:
                        code, sig = wait_status(int.from_bytes(frame.payload[:4], "little",
                                                               signed=True))
                        yield ExecEvent("exit", exit_code=code, signal=sig, timed_out=timed_out,
                                        stdout_truncated=truncated["stdout"],
                                        stderr_truncated=truncated["stderr"],
                                        duration=time.monotonic() - started)
                        return
                    elif frame.type == initproto.FAIL:
                        raise initproto.error_from_fail(frame.payload.decode(errors="replace"))
                raise Internal("the sandbox's init closed the connection before the process "
                               "exited (was the sandbox destroyed?)")
            finally:
                feeder.cancel()
                if timer:
                    timer.cancel()

    # ---- detached execs (kept processes) -------------------------------------------------
    # Started with exec(detach=True): the init owns them (a session-like record that
    # outlives the process), so they survive the call, the daemon's restart and full
    # checkpoints. No connection stays open for them: they never hold up a checkpoint.

    async def exec_detached(self, ref: str, argv: list[str], env: dict | None = None,
                            cwd: str = "/", stdin: bytes = b"") -> ProcessInfo:
        """Start argv and return at once with its handle; stdin is written, then closed."""
        if not argv or not argv[0]:
            raise InvalidArgument("argv must not be empty")
        if len(stdin) > MAX_DETACHED_STDIN:
            raise InvalidArgument(f"a detached exec takes at most {MAX_DETACHED_STDIN} bytes "
                                  "of stdin")
        rec, rt = self._ctx.running(ref)
        process_id = "p-" + secrets.token_hex(5)
        async with rt.control():
            conv, pid = await rt.channel.spawn(argv, sandbox_env(rec, env), cwd or "/",
                                               session=PROCESS_PREFIX + process_id, keep=True)
            async with conv:  # closing detaches it; init takes the input first
                await _feed_stdin(conv, stdin)
        log.info("exec.detached", sandbox=rec.id, process=process_id, pid=pid)
        return ProcessInfo(process_id, pid, " ".join(argv)[:255], True)

    async def _query_process(self, ref: str, process_id: str, signal_number: int = 0,
                             output: bool = False) -> initproto.ProcessState:
        validate_name(process_id, "process")
        rec, rt = self._ctx.running(ref)
        async with rt.control():
            try:
                return await rt.channel.query(PROCESS_PREFIX + process_id, signal_number,
                                              output)
            except NotFound:
                raise ProcessNotFound(f"no process {process_id!r} in sandbox {rec.name}") from None

    async def list_processes(self, ref: str) -> list[ProcessInfo]:
        """Detached execs, running or ended (init remembers the 32 that ended last)."""
        rec, rt = self._ctx.running(ref)
        async with rt.control():
            names = [n for n in await rt.channel.list_sessions() if n.startswith(PROCESS_PREFIX)]
        out = []
        for name in reversed(names):  # init lists the newest first
            try:
                st = await self._query_process(ref, name[len(PROCESS_PREFIX):])
            except NotFound:  # forgotten in between
                continue
            out.append(ProcessInfo.from_state(name[len(PROCESS_PREFIX):], st))
        return out

    async def get_process(self, ref: str, process_id: str) -> ProcessInfo:
        return ProcessInfo.from_state(process_id, await self._query_process(ref, process_id))

    async def signal_process(self, ref: str, process_id: str, sig: int) -> ProcessInfo:
        """Send `sig` to the process group of a running detached exec."""
        if not 1 <= sig <= 64:
            raise InvalidArgument(f"signal must be 1-64, not {sig}")
        st = await self._query_process(ref, process_id, sig)
        if st.status is not None:
            raise FailedPrecondition(f"process {process_id} has ended")
        return ProcessInfo.from_state(process_id, st)

    async def wait_process(self, ref: str, process_id: str, timeout: float = 0.0) -> ProcessInfo:
        """Wait until the detached exec ends. It polls (no connection stays open, so a
        checkpoint may run meanwhile); DeadlineExceeded after `timeout` (0 = none)."""
        if timeout < 0:
            raise InvalidArgument("timeout must be >= 0")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        delay = 0.005
        while True:
            st = await self._query_process(ref, process_id)
            if st.status is not None:
                return ProcessInfo.from_state(process_id, st)
            left = deadline - loop.time() if deadline is not None else delay
            if left <= 0:
                raise DeadlineExceeded(f"process {process_id} still runs after {timeout}s")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.2)

    async def process_logs(self, ref: str, process_id: str,
                           follow: bool = False) -> AsyncIterator[ExecEvent]:
        """The kept output of a detached exec (stdout, then stderr: their interleaving is
        not kept), then `exit` if it has ended. `follow`: attach, relay live output and
        end with its exit -- an attached call, like exec (one follower at a time)."""
        if not follow:
            st = await self._query_process(ref, process_id, output=True)
            if st.stdout:
                yield ExecEvent("stdout", data=st.stdout, pid=st.pid)
            if st.stderr:
                yield ExecEvent("stderr", data=st.stderr, pid=st.pid)
            if st.status is not None:
                yield _process_exit(st, len(st.stdout), len(st.stderr))
            return
        validate_name(process_id, "process")
        rec, rt = self._ctx.running(ref)
        sizes = {initproto.STDOUT: 0, initproto.STDERR: 0}
        async with rt.busy():
            try:
                conv, _ = await rt.channel.attach(PROCESS_PREFIX + process_id)
            except NotFound:
                raise ProcessNotFound(f"no process {process_id!r} in sandbox {rec.name}") from None
            except FailedPrecondition:
                raise FailedPrecondition(f"process {process_id} is followed by another "
                                         "call") from None
            async with conv:
                async for frame in conv.frames():
                    if frame.type in sizes:
                        sizes[frame.type] += len(frame.payload)
                        yield ExecEvent("stdout" if frame.type == initproto.STDOUT
                                        else "stderr", data=frame.payload)
                    elif frame.type == initproto.EXIT:
                        break
                else:
                    raise Internal("the sandbox's init closed the connection before the "
                                   "process ended (was the sandbox destroyed?)")
        st = await self._query_process(ref, process_id)
        yield _process_exit(st, sizes[initproto.STDOUT], sizes[initproto.STDERR])

    # ---- interactive shell -------------------------------------------------------------

    async def shell(self, ref: str, argv: list[str], env: dict | None, rows: int, cols: int,
                    inputs: AsyncIterator[tuple[str, object]]) -> AsyncIterator[ExecEvent]:
        """A pty-backed process; `inputs` yields ('stdin', bytes) or ('resize', (r, c))."""
        rec, rt = self._ctx.running(ref)
        if not argv:
            argv = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -l; "
                    "else exec sh -l; fi"]
        async with rt.busy():
            async for ev in self._shell_conversation(rt, rec, argv, env, rows, cols, inputs):
                yield ev

    async def _shell_conversation(self, rt, rec, argv, env, rows, cols, inputs):
        conv, pid = await rt.channel.spawn(argv, sandbox_env(rec, env), "/root", pty=True,
                                           rows=rows or 24, cols=cols or 80)
        started = time.monotonic()
        async with conv:
            async def pump() -> None:
                async for kind, value in inputs:
                    if kind == "stdin":
                        await conv.send(initproto.STDIN, value)  # type: ignore[arg-type]
                    elif kind == "resize":
                        await conv.send_winsize(*value)  # type: ignore[misc]
            pumper = asyncio.create_task(pump())
            recv: asyncio.Future | None = None

            def pump_failed() -> BaseException | None:
                if pumper.done() and not pumper.cancelled():
                    return pumper.exception()
                return None
            try:
                while True:
                    # Each frame is awaited beside the pump: bad input (a window size out
                    # of range, a message that does not parse) ends the pump, and must end
                    # the call with its error -- not leave the shell running with nobody
                    # reading the client's input until the deadline.
                    if (error := pump_failed()) is not None:
                        raise error
                    recv = asyncio.ensure_future(conv.recv())
                    await asyncio.wait({recv} if pumper.done() else {recv, pumper},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not recv.done():  # the pump ended first
                        if (error := pump_failed()) is not None:
                            raise error
                        await asyncio.wait({recv})  # its input closed: read on
                    frame = recv.result()
                    if frame is None:
                        return
                    if frame.type in (initproto.STDOUT, initproto.STDERR):
                        yield ExecEvent("stdout", data=frame.payload)
                    elif frame.type == initproto.EXIT:
                        code, sig = wait_status(int.from_bytes(frame.payload[:4], "little",
                                                               signed=True))
                        yield ExecEvent("exit", exit_code=code, signal=sig,
                                        duration=time.monotonic() - started)
                        return
            finally:
                pumper.cancel()
                if recv is not None and not recv.done():
                    recv.cancel()


def _process_exit(st: initproto.ProcessState, stdout_seen: int, stderr_seen: int) -> ExecEvent:
    code, sig = wait_status(st.status or 0)
    return ExecEvent("exit", pid=st.pid, exit_code=code, signal=sig,
                     stdout_truncated=st.stdout_bytes > stdout_seen,
                     stderr_truncated=st.stderr_bytes > stderr_seen)


async def _feed_stdin(conv: initproto.Conversation, data: bytes) -> None:
    if data:
        await conv.send(initproto.STDIN, data)
    await conv.send(initproto.STDIN_EOF)
