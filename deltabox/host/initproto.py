"""Client side of the protocol spoken with a sandbox's init (docs/init-protocol.md).

The init listens on /dev/.deltabox/init.sock inside the sandbox; the daemon
reaches it through /proc/<init-pid>/root. Every conversation is one short-lived
connection, so no connection to the host is open while the sandbox is
checkpointed.

Root inside the sandbox owns that path: it may replace any part of it with a
symlink (to another sandbox's socket, or to a host socket) to redirect the
daemon's connection, and with it the caller's argv and env. So the socket is
resolved inside the init's root with no symlink followed, connected to through
that resolved inode, and the peer must be the init itself.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass
from typing import AsyncIterator

from deltabox.host import linux
from deltabox.errors import (Internal, InvalidArgument, ProcessNotFound, ResourceExhausted,
                             SessionNotFound, Unavailable, error_from_errno)

__all__ = ["InitChannel", "Conversation", "Frame", "ProcessState", "SOCKET_IN_SANDBOX"]

SOCKET_IN_SANDBOX = "/dev/.deltabox/init.sock"
HEADER = struct.Struct("<BI")
MAX_PAYLOAD = 1 << 20
RECV_CHUNK = 256 << 10

# client -> init
HELLO, SPAWN, ATTACH, STDIN, STDIN_EOF, SIGNAL, WINSIZE, LIST, QUERY = (
    b"H", b"S", b"A", b"I", b"i", b"K", b"W", b"L", b"Q")
# init -> client
HELLO_REPLY, STARTED, STDOUT, STDERR, EXIT, FAIL, LIST_REPLY, QUERY_REPLY = (
    b"h", b"P", b"O", b"R", b"E", b"F", b"l", b"q")


@dataclass(frozen=True)
class Frame:
    type: bytes
    payload: bytes


@dataclass(frozen=True)
class ProcessState:
    """A named process (a session or a kept process) as init's QUERY reports it."""
    pid: int
    command: str              # kept processes only
    stdout_bytes: int         # everything it wrote; the tail holds the newest 1 MiB
    stderr_bytes: int
    status: int | None        # raw wait status once it has ended (and its output is read)
    stdout: bytes = b""       # the tails, when asked for
    stderr: bytes = b""


def encode_spawn(argv: list[str], env: dict[str, str], cwd: str, pty: bool = False,
                 rows: int = 0, cols: int = 0, session: str | None = None,
                 keep: bool = False) -> bytes:
    recs = [f"a:{a}" for a in argv] + [f"e:{k}={v}" for k, v in env.items()]
    recs.append(f"c:{cwd or '/'}")
    if pty:
        recs.append("t:1")
        if rows and cols:
            recs.append(f"w:{rows}x{cols}")
    if session:
        recs.append(f"n:{session}")
    if keep:
        recs.append("k:1")
    for r in recs:
        if "\0" in r:
            raise InvalidArgument("argv, env and cwd must not contain NUL bytes")
    payload = b"".join(r.encode() + b"\0" for r in recs)
    if len(payload) > MAX_PAYLOAD:
        # One SPAWN is one frame: init refuses a bigger one (a split one is malformed).
        raise InvalidArgument(f"argv, env and cwd take {len(payload):,} bytes together; "
                              f"a process is started with at most {MAX_PAYLOAD:,} (1 MiB): "
                              "pass large data through stdin or a file")
    return payload


_ERRNO_RE = re.compile(r"errno=(\d+)")


def _records(payload: bytes) -> dict[str, str]:
    """'K:value\0' records of an init reply (untrusted: malformed ones are an error)."""
    if payload and not payload.endswith(b"\0"):
        raise Internal("sandbox init sent unterminated records")
    out = {}
    for rec in payload.split(b"\0")[:-1]:
        if len(rec) < 2 or rec[1:2] != b":":
            raise Internal("sandbox init sent a malformed record")
        out[rec[:1].decode("ascii", "replace")] = rec[2:].decode(errors="replace")
    return out


def _count(value: str | None, what: str, signed: bool = False) -> int:
    try:
        n = int(value or "")
    except ValueError:
        raise Internal(f"sandbox init sent a bad {what}: {value!r}") from None
    if not (-(1 << 31) <= n < (1 << 31) if signed else 0 <= n < (1 << 63)):
        raise Internal(f"sandbox init sent a bad {what}: {value!r}")
    return n


def error_from_fail(message: str):
    """Map an init 'F' frame ("errno=<n> <step>: <message>") to a domain error, through
    the one errno mapping (errors.error_from_errno) plus what only the init's words say."""
    m = _ERRNO_RE.search(message)
    code = int(m.group(1)) if m else 0
    text = _ERRNO_RE.sub("", message).strip()
    if code == errno_mod.ENOENT and "no such session" in text:
        return SessionNotFound(text)
    if code == errno_mod.ENOENT and "no such process" in text:
        return ProcessNotFound(text)
    if code == errno_mod.E2BIG:  # execve: one string over 128 KiB, or all over ARG_MAX
        return InvalidArgument(f"{text} (an argument or environment string is at most "
                               "128 KiB: pass large data through stdin or a file)")
    if code in (errno_mod.EAGAIN, errno_mod.ENOMEM):  # fork or exec inside the limits
        return ResourceExhausted(f"{text} (the sandbox is at its pids or memory limit)")
    # EINVAL from the init is a request of ours it found malformed: our bug, not the caller's.
    err = error_from_errno(code, text) if code and code != errno_mod.EINVAL else None
    return err or Internal(f"sandbox init: {message}")


class Conversation:
    """One connection to init; used as an async context manager.

    Raw non-blocking socket I/O rather than asyncio streams: init may close its
    end (the process ended) while we still send input, and a failed write must
    not discard output already received, as a stream's reader would.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._eof = False
        self._loop = asyncio.get_running_loop()

    async def send(self, ftype: bytes, payload: bytes = b"") -> bool:
        """Send one frame; False if init already closed the connection (the
        process ended), which callers sending input or signals may ignore."""
        try:
            for i in range(0, max(len(payload), 1), MAX_PAYLOAD):
                chunk = payload[i:i + MAX_PAYLOAD]
                await self._loop.sock_sendall(self.sock, HEADER.pack(ftype[0], len(chunk)) + chunk)
        except OSError:
            return False
        return True

    async def send_signal(self, sig: int) -> bool:
        return await self.send(SIGNAL, struct.pack("<I", sig))

    async def send_winsize(self, rows: int, cols: int) -> bool:
        return await self.send(WINSIZE, struct.pack("<HH", rows, cols))

    async def _fill(self, n: int) -> bool:
        """Buffer at least n bytes; False at end of stream."""
        while len(self._buf) < n and not self._eof:
            try:
                data = await self._loop.sock_recv(self.sock, RECV_CHUNK)
            except ConnectionResetError:
                data = b""
            if not data:
                self._eof = True
            self._buf += data
        return len(self._buf) >= n

    async def recv(self) -> Frame | None:
        """The next frame, or None when init closed the connection."""
        if not await self._fill(HEADER.size):
            if self._buf:
                raise Internal("sandbox init closed the connection mid-frame")
            return None
        ftype, length = HEADER.unpack_from(self._buf)
        if length > MAX_PAYLOAD:
            raise Internal(f"sandbox init sent an oversized frame ({length} bytes)")
        if not await self._fill(HEADER.size + length):
            raise Internal("sandbox init closed the connection mid-frame")
        payload = bytes(self._buf[HEADER.size:HEADER.size + length])
        del self._buf[:HEADER.size + length]
        return Frame(bytes([ftype]), payload)

    async def frames(self) -> AsyncIterator[Frame]:
        while (frame := await self.recv()) is not None:
            yield frame

    async def expect_started(self) -> int:
        """Wait for 'P' (returns the pid) or raise the error of an 'F'."""
        frame = await self.recv()
        if frame is None:
            raise Internal("sandbox init closed the connection before starting the process")
        if frame.type == FAIL:
            raise error_from_fail(frame.payload.decode(errors="replace"))
        if frame.type != STARTED:
            raise Internal(f"sandbox init: unexpected frame {frame.type!r}")
        return struct.unpack("<I", frame.payload)[0]

    def close(self) -> None:
        self.sock.close()

    async def __aenter__(self) -> "Conversation":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class InitChannel:
    """How the daemon reaches one sandbox's init."""

    def __init__(self, init_pid: int):
        self.init_pid = init_pid

    def _open_socket_inode(self) -> int:
        """An O_PATH fd of the init's socket, resolved inside the init's root with
        no symlink (or magic link) followed."""
        root = os.open(f"/proc/{self.init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = linux.openat2(root, SOCKET_IN_SANDBOX, os.O_PATH | os.O_NOFOLLOW,
                                resolve=linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_SYMLINKS
                                | linux.RESOLVE_NO_MAGICLINKS)
        finally:
            os.close(root)
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno_mod.ENOTSOCK, "not a socket")
        return fd

    async def connect(self) -> Conversation:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            fd = self._open_socket_inode()
            try:  # connect(2) through the magic link reaches exactly that inode
                await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            peer_pid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            if peer_pid != self.init_pid:
                raise OSError(errno_mod.EACCES, f"the socket is served by pid {peer_pid}, "
                              "not by the sandbox's init")
        except OSError as e:
            sock.close()
            raise Unavailable(f"the sandbox's init (pid {self.init_pid}) does not answer: "
                              f"{e.strerror or e}") from None
        return Conversation(sock)

    async def hello(self) -> str:
        async with await self.connect() as conv:
            await conv.send(HELLO)
            frame = await conv.recv()
            if frame is None or frame.type != HELLO_REPLY:
                raise Internal("sandbox init did not answer HELLO")
            return frame.payload.decode()

    async def barrier(self) -> None:
        """Return once init has closed every earlier connection (needed before a
        CRIU dump: a connection to the host cannot be dumped). Init handles
        connections in order and closes this one after its reply, so reading it
        to the end is the barrier."""
        await self.list_sessions()

    async def list_sessions(self) -> dict[str, int]:
        async with await self.connect() as conv:
            await conv.send(LIST)
            frame = await conv.recv()
            if frame is None or frame.type != LIST_REPLY:
                raise Internal("sandbox init did not answer LIST")
            parts = frame.payload.split(b"\0")
            while await conv.recv() is not None:  # to the end: see barrier()
                pass
            return {parts[i].decode(): int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}

    async def query(self, name: str, signal: int = 0, output: bool = False,
                    remove: bool = False) -> ProcessState:
        """The state of a named process without attaching to it (QUERY); optionally
        signal its group first, fetch its kept output, or forget it once ended."""
        recs = [f"n:{name}"] + ([f"s:{int(signal)}"] if signal else []) + \
            (["o:1"] if output else []) + (["r:1"] if remove else [])
        if "\0" in name:
            raise InvalidArgument("process names must not contain NUL bytes")
        async with await self.connect() as conv:
            await conv.send(QUERY, b"".join(r.encode() + b"\0" for r in recs))
            frame = await conv.recv()
            if frame is None:
                raise Internal("sandbox init closed the connection before answering QUERY")
            if frame.type == FAIL:
                raise error_from_fail(frame.payload.decode(errors="replace"))
            if frame.type != QUERY_REPLY:
                raise Internal(f"sandbox init: unexpected frame {frame.type!r}")
            recs_in = _records(frame.payload)
            out, err = bytearray(), bytearray()
            while (frame := await conv.recv()) is not None:
                if frame.type == STDOUT:
                    out += frame.payload
                elif frame.type == STDERR:
                    err += frame.payload
        return ProcessState(
            pid=_count(recs_in.get("p"), "pid"), command=recs_in.get("c", ""),
            stdout_bytes=_count(recs_in.get("o", "0"), "byte count"),
            stderr_bytes=_count(recs_in.get("e", "0"), "byte count"),
            status=_count(recs_in["x"], "wait status", signed=True) if "x" in recs_in else None,
            stdout=bytes(out), stderr=bytes(err))

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: str = "/",
                    pty: bool = False, rows: int = 0, cols: int = 0,
                    session: str | None = None, keep: bool = False) -> tuple[Conversation, int]:
        conv = await self.connect()
        try:
            await conv.send(SPAWN, encode_spawn(argv, env, cwd, pty, rows, cols, session, keep))
            pid = await conv.expect_started()
        except BaseException:
            conv.close()
            raise
        return conv, pid

    async def attach(self, session: str) -> tuple[Conversation, int]:
        conv = await self.connect()
        try:
            await conv.send(ATTACH, session.encode())
            pid = await conv.expect_started()
        except BaseException:
            conv.close()
            raise
        return conv, pid
