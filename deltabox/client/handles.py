"""The handle classes' shared parts, and the generator of their methods.

`install(cls, owner, asynchronous)` gives a class one method per operation of `owner` in
the operation table (`operations.py`): same name, same parameters (the builder's, plus a
keyword-only `deadline`), same docstring, for the blocking and the asyncio family alike.
Each generated method builds the `Call` and hands it to the client's core (`_run` for a
result, `_open` for a stream or a shell); the core is what differs between the families.
"""

from __future__ import annotations

import inspect
import re

from deltabox.client.connection import DEFAULT
from deltabox.client.operations import Operation, operations_of
from deltabox.client.results import ProcessInfo, SandboxInfo, SessionInfo

__all__ = ["install", "SandboxHandle", "SessionHandle", "ProcessHandle", "AwaitableHandle"]

_DEADLINE = inspect.Parameter("deadline", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT,
                              annotation="float | None")


def _async_annotation(text: str) -> str:
    text = re.sub(r"\b(Sandbox|Session|Process|Shell)\b", r"Async\1", text)
    return re.sub(r"\bIterator\b", "AsyncIterator", text)


def signature_of(op: Operation, asynchronous: bool) -> inspect.Signature:
    """The generated method's signature: the builder's, with `deadline` added."""
    sig = inspect.signature(op.build)
    params = list(sig.parameters.values())
    params = [params[0].replace(name="self"), *params[1:], _DEADLINE]
    returns = _async_annotation(op.returns) if asynchronous else op.returns
    return sig.replace(parameters=params, return_annotation=returns)


def _method(op: Operation, asynchronous: bool):
    build = op.build
    if not asynchronous or op.shape in ("iter", "shell"):
        # A result now (blocking), or a stream / shell object to iterate (both families).
        def method(self, *args, deadline=DEFAULT, **kwargs):
            call = build(self, *args, **kwargs)
            if op.shape in ("iter", "shell"):
                return self._core._open(op, call, deadline)
            return self._core._run(op, call, self, deadline)
    elif op.closable:
        def method(self, *args, deadline=DEFAULT, **kwargs):
            call = build(self, *args, **kwargs)
            return AwaitableHandle(self._core._run(op, call, self, deadline))
    else:
        async def method(self, *args, deadline=DEFAULT, **kwargs):
            call = build(self, *args, **kwargs)
            return await self._core._run(op, call, self, deadline)
    method.__name__ = op.name
    method.__doc__ = op.doc or build.__doc__
    method.__signature__ = signature_of(op, asynchronous)
    method.operation = op
    return method


def install(cls, owner: str, asynchronous: bool):
    """Add the methods of `owner`'s operations to `cls` (a class decorator's body)."""
    for op in operations_of(owner):
        m = _method(op, asynchronous)
        m.__qualname__ = f"{cls.__name__}.{op.name}"
        setattr(cls, op.name, m)
    return cls


class AwaitableHandle:
    """What an asyncio `create` / `open_session` returns: await it for the handle, or use
    it directly as an async context manager, which closes the handle on exit:

        sbx = await client.create("tiny")              # then: await sbx.destroy()
        async with client.create("tiny") as sbx: ...   # destroyed on exit
        async with await client.create("tiny") as sbx: ...   # (the older form)
    """

    def __init__(self, coro):
        self._coro = coro
        self._handle = None

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self):
        self._handle = await self._coro
        return await self._handle.__aenter__()

    async def __aexit__(self, *exc):
        return await self._handle.__aexit__(*exc)


# ---- what the handles hold (the same in both families) -----------------------------------------

class SandboxHandle:
    """What a sandbox handle holds: its client and what the daemon last said (`info`)."""

    def __init__(self, client, info: SandboxInfo):
        if not isinstance(info, SandboxInfo):
            raise TypeError(f"info must be a SandboxInfo, not {type(info).__name__}")
        self._client = client
        self.info = info

    id = property(lambda self: self.info.id)
    name = property(lambda self: self.info.name)
    _core = property(lambda self: self._client)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.id} {self.info.name!r}>"


class SessionHandle:
    def __init__(self, sandbox, info: SessionInfo):
        self.sandbox = sandbox
        self.info = info

    name = property(lambda self: self.info.name)
    _core = property(lambda self: self.sandbox._client)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.name} ({self.info.kind}) in {self.sandbox.id}>"


class ProcessHandle:
    def __init__(self, sandbox, info: ProcessInfo):
        self.sandbox = sandbox
        self.info = info

    id = property(lambda self: self.info.id)
    pid = property(lambda self: self.info.pid)
    _core = property(lambda self: self.sandbox._client)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.id} pid {self.info.pid} in {self.sandbox.id}>"
