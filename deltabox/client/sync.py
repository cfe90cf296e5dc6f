"""The blocking client: `Client` and its handles `Sandbox`, `Session`, `Process`, `Shell`.

    with deltabox.Client() as client:
        with client.create("tiny") as sbx:          # destroyed on exit
            r = sbx.exec(["echo", "hi"])
            assert r.stdout == b"hi\\n"
            sh = sbx.open_session("sh")
            sh.run("X=5"); assert sh.run("echo $X").stdout == b"5\\n"

The methods come from the operation table (`operations.py`, installed by `handles.py`);
this module only says how a blocking call waits, retries and streams.
"""

from __future__ import annotations

import os
import queue
import time
from types import SimpleNamespace

import grpc

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc
from deltabox.client.connection import (DEFAULT, RETRY_PAUSE, Retry, default_target,
                                        error_from_rpc, is_unavailable, open_channel)
from deltabox.client.handles import ProcessHandle, SandboxHandle, SessionHandle, install
from deltabox.client.operations import Call, Operation
from deltabox.client.results import ShellExit
from deltabox.client.transfer import send_checkpoint

__all__ = ["Client", "Sandbox", "Session", "Process", "Shell"]


def stubs(channel) -> dict:
    return {"images": pb_grpc.ImagesStub(channel), "sandboxes": pb_grpc.SandboxesStub(channel),
            "checkpoints": pb_grpc.CheckpointsStub(channel), "system": pb_grpc.SystemStub(channel)}


class Client:
    """Blocking client. `socket`: a unix socket path (default), or host:port of a daemon
    listening on TCP, which needs `tls_ca` (its certificate or CA) and its bearer token:
    `token_file` (a chmod-600 file), `token`, or else $DELTABOX_TOKEN. `timeout`: the
    default deadline of calls without a limit of their own; `retry`: when a call is sent
    again after UNAVAILABLE (None: never). See `deltabox.client.connection`."""

    def __init__(self, socket: str | os.PathLike | None = None, *, timeout: float | None = None,
                 tls_ca: str | os.PathLike | None = None, token: str | None = None,
                 token_file: str | os.PathLike | None = None, retry: Retry | None = Retry()):
        self.target = default_target(socket)
        self.timeout = timeout
        self.retry = retry
        self._channel = open_channel(grpc, self.target, tls_ca, token, token_file)
        self._stubs = stubs(self._channel)

    _core = property(lambda self: self)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the core: how a blocking call is made -------------------------------------------

    def _deadline(self, call: Call, deadline) -> float | None:
        if deadline is not DEFAULT:
            return deadline
        return self.timeout if call.deadline is DEFAULT else call.deadline

    def _run(self, op: Operation, call: Call, handle, deadline):
        timeout = self._deadline(call, deadline)
        retry = self.retry is not None and self.retry.allows(op.idempotent)
        end = None if timeout is None else time.monotonic() + timeout
        give_up = None  # the end of the retry window, from the first UNAVAILABLE
        while True:
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                reply = self._once(op, call, left)
                break
            except grpc.RpcError as e:
                if retry and is_unavailable(e):
                    if give_up is None:
                        give_up = time.monotonic() + self.retry.window
                    if self._ready_again(give_up if end is None else min(end, give_up)):
                        continue
                raise error_from_rpc(e) from None
        return call.convert(handle, reply)

    def _once(self, op: Operation, call: Call, timeout: float | None):
        rpc = getattr(self._stubs[op.service], op.rpc)
        if call.fold is None:
            return rpc(call.request, timeout=timeout)
        folder = call.fold()
        for item in rpc(call.request, timeout=timeout):
            folder.add(item)
        return folder.result()

    def _ready_again(self, until: float) -> bool:
        """Wait until `until` at most for the channel to connect again; True if it did."""
        time.sleep(min(RETRY_PAUSE, max(0.0, until - time.monotonic())))  # no busy loop
        wait = until - time.monotonic()
        if wait <= 0:
            return False
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait)
            return True
        except grpc.FutureTimeoutError:
            return False

    def _open(self, op: Operation, call: Call, deadline):
        timeout = self._deadline(call, deadline)
        if op.shape == "shell":
            return Shell(self, call.request, timeout)
        return self._iterate(op, call, timeout)

    def _iterate(self, op: Operation, call: Call, timeout):
        try:
            for item in getattr(self._stubs[op.service], op.rpc)(call.request, timeout=timeout):
                yield call.item(item)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None


class Sandbox(SandboxHandle):
    """A sandbox handle; a context manager that destroys the sandbox on exit."""

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


class Session(SessionHandle):
    """A persistent bash/sh/python session inside a sandbox; closed on `with` exit."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Process(ProcessHandle):
    """A detached exec (`sandbox.exec(cmd, detach=True)`): owned by the sandbox's init,
    it outlives this handle, the client and the daemon's restarts."""


class Shell:
    """An interactive terminal (`client.shell(...)`, `sandbox.shell(...)`): `send` input,
    `resize` it, iterate for its output (bytes); `exit` once it has ended. Closing it (or
    leaving its `with`) ends the call, which kills the shell's processes."""

    def __init__(self, client: Client, start: pb.ShellInput, timeout: float | None):
        self._inbox: queue.Queue = queue.Queue()
        self._inbox.put(start)
        self.exit: ShellExit | None = None
        self._call = client._stubs["sandboxes"].Shell(self._requests(), timeout=timeout)

    def _requests(self):
        while (msg := self._inbox.get()) is not None:
            yield msg

    def send(self, data: bytes | str) -> None:
        self._inbox.put(pb.ShellInput(stdin=data.encode() if isinstance(data, str) else data))

    def resize(self, rows: int, cols: int) -> None:
        self._inbox.put(pb.ShellInput(resize=pb.WindowSize(rows=rows, cols=cols)))

    def __iter__(self):
        try:
            for out in self._call:
                if out.WhichOneof("output") == "data":
                    yield out.data
                else:
                    self.exit = ShellExit(out.exit.exit_code, out.exit.signal)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def close(self) -> None:
        self._inbox.put(None)
        self._call.cancel()

    def __enter__(self) -> "Shell":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


for _cls, _owner in ((Client, "client"), (Sandbox, "sandbox"), (Session, "session"),
                     (Process, "process")):
    install(_cls, _owner, asynchronous=False)
    _cls._family = SimpleNamespace(Sandbox=Sandbox, Session=Session, Process=Process)
Client.send_checkpoint = send_checkpoint  # two clients: not one operation
