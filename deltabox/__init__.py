"""DeltaBox: millisecond checkpoint, rollback and fork for AI-agent sandboxes.

Public API: `Client` and `AsyncClient` (and their `Sandbox` objects) talk to the daemon
over gRPC and return the dataclasses of `deltabox.client` (`SandboxInfo`,
`CheckpointInfo`, ...) whose words are the enums of `deltabox.types`; the exceptions in
`deltabox.errors` are raised on both sides alike. Importing it needs grpcio and protobuf
only, none of the daemon's dependencies.
"""

__version__ = "0.1.0"

from deltabox.client import (AsyncClient, AsyncProcess, AsyncSandbox,  # noqa: E402
                             AsyncSession, CheckpointInfo, Client, ExecResult, FileInfo,
                             Process, ProcessInfo, ProcessOutput, Retry, RollbackResult,
                             Sandbox, SandboxInfo, Session, SessionInfo, Status)
from deltabox.errors import *  # noqa: E402,F401,F403
from deltabox.errors import __all__ as _errors_all  # noqa: E402
from deltabox.types import (CheckpointMode, DiffChange, FileType, NetworkMode,  # noqa: E402
                            RollbackPath, SandboxState, SessionKind)

__all__ = ["__version__", "Client", "AsyncClient", "Sandbox", "AsyncSandbox", "Session",
           "AsyncSession", "Process", "AsyncProcess", "Retry", "ExecResult", "ProcessOutput",
           "SandboxInfo", "CheckpointInfo", "RollbackResult", "ProcessInfo", "SessionInfo",
           "FileInfo", "Status", "SandboxState", "CheckpointMode", "RollbackPath",
           "NetworkMode", "SessionKind", "FileType", "DiffChange", *_errors_all]
