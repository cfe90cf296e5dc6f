"""Python client for the DeltaBox daemon: `Client` (blocking) and `AsyncClient` (asyncio).

    with deltabox.Client() as client:
        with client.create("tiny") as sbx:          # destroyed on exit
            r = sbx.exec(["echo", "hi"])
            assert r.stdout == b"hi\\n"

    async with deltabox.AsyncClient() as client:
        async with client.create("tiny") as sbx:
            r = await sbx.exec(["echo", "hi"])

The package, module by module:
    operations.py  every call, described once (RPC, request builder, reply converter);
                   both clients' methods are generated from it, so they cannot drift
    results.py     what calls return: dataclasses using deltabox.types, never protobuf
    connection.py  target, TLS + token, the channel, deadlines, retries, error mapping
    handles.py     the method generator and the handles' shared state
    sync.py        Client, Sandbox, Session, Process, Shell (blocking)
    aio.py         AsyncClient, AsyncSandbox, AsyncSession, AsyncProcess, AsyncShell

It needs grpcio and protobuf only (none of the daemon's dependencies). Errors arrive as
the same exception classes the daemon raised (`deltabox.errors`).
"""

from deltabox.client.aio import AsyncClient, AsyncProcess, AsyncSandbox, AsyncSession, AsyncShell
from deltabox.client.connection import (TOKEN_ENV, Retry, default_target, load_token,
                                        read_token_file)
from deltabox.client.handles import AwaitableHandle
from deltabox.client.results import (CheckpointInfo, DiffEntry, ExecEvent, ExecExit,
                                     ExecResult, ExecStarted, FileInfo, ForkChild, ForkResult,
                                     ImageInfo, ImportProgress, Limits, OperationStats,
                                     ProcessInfo, ProcessOutput, RollbackResult, SandboxInfo,
                                     SessionInfo, SessionResult, ShellExit, Stats, Status)
from deltabox.client.sync import Client, Process, Sandbox, Session, Shell

__all__ = ["Client", "AsyncClient", "Sandbox", "AsyncSandbox", "Session", "AsyncSession",
           "Process", "AsyncProcess", "Shell", "AsyncShell", "AwaitableHandle", "Retry",
           "SandboxInfo", "Limits", "ImageInfo", "ImportProgress", "ExecEvent", "ExecStarted",
           "ExecExit", "ExecResult", "ProcessInfo", "ProcessOutput", "SessionInfo",
           "SessionResult", "ShellExit", "FileInfo", "CheckpointInfo", "RollbackResult",
           "ForkChild", "ForkResult", "DiffEntry", "Status", "Stats", "OperationStats",
           "default_target", "read_token_file", "load_token", "TOKEN_ENV"]
