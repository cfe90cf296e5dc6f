"""The asyncio client: `AsyncClient` and its handles, with the same methods as `Client`'s
(the same operation table), as coroutines.

    async with deltabox.AsyncClient() as client:
        async with client.create("tiny") as sbx:     # destroyed on exit
            r = await sbx.exec(["echo", "hi"])

`exec_stream` and `logs_stream` return async iterators, `shell` an `AsyncShell`; `create`
and `open_session` return an awaitable that is also an async context manager.
"""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import grpc
import grpc.aio

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.client.connection import (DEFAULT, RETRY_PAUSE, Retry, default_target,
                                        error_from_rpc, is_unavailable, open_channel)
from deltabox.client.handles import ProcessHandle, SandboxHandle, SessionHandle, install
from deltabox.client.operations import Call, Operation
from deltabox.client.results import ShellExit
from deltabox.client.transfer import send_checkpoint_async
from deltabox.client.sync import stubs

__all__ = ["AsyncClient", "AsyncSandbox", "AsyncSession", "AsyncProcess", "AsyncShell"]


class AsyncClient:
    """asyncio client with the same methods and arguments as `Client`, as coroutines."""

    def __init__(self, socket: str | os.PathLike | None = None, *, timeout: float | None = None,
                 tls_ca: str | os.PathLike | None = None, token: str | None = None,
                 token_file: str | os.PathLike | None = None, retry: Retry | None = Retry()):
        self.target = default_target(socket)
        self.timeout = timeout
        self.retry = retry
        self._channel = open_channel(grpc.aio, self.target, tls_ca, token, token_file)
        self._stubs = stubs(self._channel)

    _core = property(lambda self: self)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- the core: how an asyncio call is made (as Client's, awaiting) ---------------------

    def _deadline(self, call: Call, deadline) -> float | None:
        if deadline is not DEFAULT:
            return deadline
        return self.timeout if call.deadline is DEFAULT else call.deadline

    async def _run(self, op: Operation, call: Call, handle, deadline):
        timeout = self._deadline(call, deadline)
        retry = self.retry is not None and self.retry.allows(op.idempotent)
        end = None if timeout is None else time.monotonic() + timeout
        give_up = None  # the end of the retry window, from the first UNAVAILABLE
        while True:
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                reply = await self._once(op, call, left)
                break
            except grpc.RpcError as e:
                if retry and is_unavailable(e):
                    if give_up is None:
                        give_up = time.monotonic() + self.retry.window
                    if await self._ready_again(give_up if end is None else min(end, give_up)):
                        continue
                raise error_from_rpc(e) from None
        return call.convert(handle, reply)

    async def _once(self, op: Operation, call: Call, timeout: float | None):
        rpc = getattr(self._stubs[op.service], op.rpc)
        if call.fold is None:
            return await rpc(call.request, timeout=timeout)
        folder = call.fold()
        async for item in rpc(call.request, timeout=timeout):
            folder.add(item)
        return folder.result()

    async def _ready_again(self, until: float) -> bool:
        await asyncio.sleep(min(RETRY_PAUSE, max(0.0, until - time.monotonic())))
        wait = until - time.monotonic()
        if wait <= 0:
            return False
        try:
            await asyncio.wait_for(self._channel.channel_ready(), wait)
            return True
        except asyncio.TimeoutError:
            return False

    def _open(self, op: Operation, call: Call, deadline):
        timeout = self._deadline(call, deadline)
        if op.shape == "shell":
            return AsyncShell(self, call.request, timeout)
        return self._iterate(op, call, timeout)

    async def _iterate(self, op: Operation, call: Call, timeout):
        try:
            async for item in getattr(self._stubs[op.service], op.rpc)(call.request,
                                                                       timeout=timeout):
                yield call.item(item)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None


class AsyncSandbox(SandboxHandle):
    """As Sandbox; an async context manager that destroys the sandbox on exit."""

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.destroy()


class AsyncSession(SessionHandle):
    """As Session; closed on `async with` exit."""

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncProcess(ProcessHandle):
    """As Process, for AsyncSandbox."""


class AsyncShell:
    """As Shell: `await send(...)`, `await resize(...)`, `async for data in shell`."""

    def __init__(self, client: AsyncClient, start: pb.ShellInput, timeout: float | None):
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._inbox.put_nowait(start)
        self.exit: ShellExit | None = None
        self._call = client._stubs["sandboxes"].Shell(self._requests(), timeout=timeout)

    async def _requests(self):
        while (msg := await self._inbox.get()) is not None:
            yield msg

    async def send(self, data: bytes | str) -> None:
        await self._inbox.put(pb.ShellInput(
            stdin=data.encode() if isinstance(data, str) else data))

    async def resize(self, rows: int, cols: int) -> None:
        await self._inbox.put(pb.ShellInput(resize=pb.WindowSize(rows=rows, cols=cols)))

    async def __aiter__(self):
        try:
            async for out in self._call:
                if out.WhichOneof("output") == "data":
                    yield out.data
                else:
                    self.exit = ShellExit(out.exit.exit_code, out.exit.signal)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    async def close(self) -> None:
        self._inbox.put_nowait(None)
        self._call.cancel()

    async def __aenter__(self) -> "AsyncShell":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


for _cls, _owner in ((AsyncClient, "client"), (AsyncSandbox, "sandbox"),
                     (AsyncSession, "session"), (AsyncProcess, "process")):
    install(_cls, _owner, asynchronous=True)
    _cls._family = SimpleNamespace(Sandbox=AsyncSandbox, Session=AsyncSession,
                                   Process=AsyncProcess)
AsyncClient.send_checkpoint = send_checkpoint_async  # two clients: not one operation
