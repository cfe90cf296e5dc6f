"""Sessions: long-lived shells and Python interpreters that keep state between calls.

A session is an init-owned process (`bash --norc`, `sh`, or the small Python driver at the
end of this module) named `<kind>/<name>` in init, so it outlives connections, the daemon's
restart and full checkpoints. `run` attaches, writes the code followed by a sentinel (shells:
`eval` of a quoted here-doc; Python: a length-prefixed block run in one persistent
namespace) and reads until the sentinel that carries the exit status. This wire protocol and
the driver live here, together.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from dataclasses import dataclass

import structlog

from deltabox.core.process import sandbox_env, wait_status
from deltabox.core.runtime import Runtime, SandboxContext
from deltabox.errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
                             ResourceExhausted, SessionNotFound)
from deltabox.host import initproto
from deltabox.store.records import validate_name
from deltabox.types import SessionKind

__all__ = ["Sessions", "SessionResult", "SESSION_KINDS"]

log = structlog.get_logger("deltabox.core.sessions")

SESSION_KINDS = tuple(k.value for k in SessionKind)  # ("bash", "sh", "python")


@dataclass
class SessionResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    duration: float


class Sessions:
    """Open, list, close and run code in the sessions of running sandboxes."""

    def __init__(self, ctx: SandboxContext) -> None:
        self._ctx = ctx
        self.config = ctx.config

    async def open(self, ref: str, kind: str = "bash", name: str = "",
                   env: dict | None = None, cwd: str = "/") -> tuple[str, int]:
        if kind not in SESSION_KINDS:
            raise InvalidArgument(f"session kind must be one of {SESSION_KINDS}")
        name = validate_name(name, "session") if name else f"{kind}-{secrets.token_hex(3)}"
        rec, rt = self._ctx.running(ref)
        # Ordered with rollbacks (and checkpoints): a session opened while a rollback
        # swaps incarnations would start in the old one, be acknowledged, then die
        # with it.
        async with rt.lock:
            if rt.closed or self._ctx.runtimes.get(rec.id) is not rt:
                raise FailedPrecondition(f"sandbox {rec.name} is not running")
            existing = await self._sessions(rt)
            if name in existing:
                raise FailedPrecondition(f"session {name!r} exists in {rec.name}")
            argv = {SessionKind.BASH: ["bash", "--noprofile", "--norc"],
                    SessionKind.SH: ["sh"],
                    SessionKind.PYTHON: ["python3", "-u", "-c", _PYTHON_DRIVER]}[kind]
            conv, pid = await rt.channel.spawn(argv, sandbox_env(rec, env), cwd or "/",
                                               session=f"{kind}/{name}")
            async with conv:
                if kind != SessionKind.PYTHON:
                    # A trap (unlike SIG_IGN) is reset on exec: SIGINT still stops the
                    # running command, while the shell itself survives to report.
                    await conv.send(initproto.STDIN, b"trap ':' INT\n")
        log.info("session.opened", sandbox=rec.id, session=name, kind=kind, pid=pid)
        return name, pid

    async def _sessions(self, rt: Runtime) -> dict[str, tuple[str, int]]:
        """name -> (kind, pid) of live sessions, as init reports them."""
        out = {}
        async with rt.control():
            listed = await rt.channel.list_sessions()
        for key, pid in listed.items():
            kind, _, name = key.partition("/")
            if kind in SESSION_KINDS:  # not a detached exec
                out[name] = (kind, pid)
        return out

    async def list(self, ref: str) -> list[tuple[str, str, int]]:
        rec, rt = self._ctx.running(ref)
        return [(name, kind, pid) for name, (kind, pid) in sorted((await self._sessions(rt))
                                                                  .items())]

    async def close(self, ref: str, name: str) -> None:
        rec, rt = self._ctx.running(ref)
        with rt.cut_by_lifecycle():
            sessions = await self._sessions(rt)
        if name not in sessions:
            raise SessionNotFound(f"no session {name!r} in {rec.name}")
        conv, _ = await rt.channel.attach(f"{sessions[name][0]}/{name}")
        async with conv:
            await conv.send_signal(signal.SIGKILL)
            async for frame in conv.frames():
                if frame.type == initproto.EXIT:
                    break

    async def run(self, ref: str, name: str, code: str,
                  timeout: float = 0.0) -> SessionResult:
        rec, rt = self._ctx.running(ref)
        if timeout < 0:
            raise InvalidArgument("timeout must be >= 0")
        with rt.cut_by_lifecycle():
            sessions = await self._sessions(rt)
        if name not in sessions:
            raise SessionNotFound(f"no session {name!r} in {rec.name}")
        kind = sessions[name][0]
        lock = rt.session_locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise FailedPrecondition(f"session {name!r} is busy with another call")
        async with lock:
            async with rt.busy():
                return await self.run_locked(rt, kind, name, code, timeout)

    async def run_locked(self, rt: Runtime, kind: str, name: str, code: str,
                         timeout: float) -> SessionResult:
        """Run `code` in the session; the caller holds what orders it (the session's
        lock and the gate, or the sandbox not yet being visible, as in a fork's re-seed)."""
        nonce = secrets.token_hex(8)
        if kind == SessionKind.PYTHON:
            body = code.encode()
            payload = f"{nonce} {len(body)}\n".encode() + body
        else:
            if f"__DBX_{nonce}__" in code:
                raise InvalidArgument("code contains the session delimiter")
            # eval of a quoted here-doc: the code runs in the shell itself (so its
            # variables and cwd persist) and a syntax error cannot eat the sentinel.
            payload = (f"eval \"$(cat <<'__DBX_{nonce}__'\n{code}\n__DBX_{nonce}__\n)\"\n"
                       f"printf '\\036{nonce}:%d\\036' \"$?\"; printf '\\036{nonce}\\036' >&2\n"
                       ).encode()
        re_out = f"\x1e{nonce}:".encode()
        err_end = f"\x1e{nonce}\x1e".encode()
        out, err = bytearray(), bytearray()
        started = time.monotonic()
        conv, _ = await rt.channel.attach(f"{kind}/{name}")
        async with conv:
            await conv.send(initproto.STDIN, payload)

            async def collect() -> int:
                exit_code = None
                async for frame in conv.frames():
                    if frame.type == initproto.STDOUT:
                        out.extend(frame.payload)
                    elif frame.type == initproto.STDERR:
                        err.extend(frame.payload)
                    elif frame.type == initproto.EXIT:
                        code_, sig = wait_status(int.from_bytes(frame.payload[:4], "little",
                                                                signed=True))
                        raise FailedPrecondition(
                            f"session {name!r} ended (exit {code_}, signal {sig}) while running "
                            f"the code; stdout: {bytes(out[-500:])!r} stderr: "
                            f"{bytes(err[-500:])!r}")
                    if len(out) + len(err) > self.config.max_output_bytes:
                        raise ResourceExhausted(f"session {name!r} produced more than "
                                                f"{self.config.max_output_bytes} bytes")
                    i = out.find(re_out)
                    if i >= 0 and exit_code is None:
                        j = out.find(b"\x1e", i + len(re_out))
                        if j >= 0:
                            exit_code = int(out[i + len(re_out):j])
                            del out[i:j + 1]
                    if exit_code is not None and err.endswith(err_end):
                        del err[-len(err_end):]
                        return exit_code
                raise Internal(f"session {name!r}: connection to init lost")

            task = asyncio.ensure_future(collect())
            try:
                exit_code = await asyncio.wait_for(asyncio.shield(task), timeout or None)
            except asyncio.TimeoutError:
                await conv.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(task, 2.0)
                    state = "interrupted (SIGINT); the session lives on"
                except (asyncio.TimeoutError, Exception):
                    await conv.send_signal(signal.SIGKILL)
                    state = "killed: it did not stop on SIGINT"
                raise DeadlineExceeded(f"session {name!r}: code ran past {timeout}s and was "
                                       f"{state}")
            finally:
                task.cancel()
        return SessionResult(bytes(out), bytes(err), exit_code, time.monotonic() - started)


# Runs inside python sessions: reads "<nonce> <length>\n<code>" blocks from stdin,
# executes each in one persistent namespace, then prints the sentinels.
_PYTHON_DRIVER = r"""
import sys, traceback
g = {"__name__": "__main__", "__builtins__": __builtins__}
inp = sys.stdin.buffer
while True:
    try:
        header = inp.readline()
        if not header:
            break
        nonce, n = header.split()
        code = inp.read(int(n)).decode()
        rc = 0
        try:
            exec(compile(code, "<session>", "exec"), g)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush(); sys.stderr.flush()
    sys.stdout.write("\x1e%s:%d\x1e" % (nonce.decode(), rc)); sys.stdout.flush()
    sys.stderr.write("\x1e%s\x1e" % nonce.decode()); sys.stderr.flush()
"""
