"""DeltaBox: millisecond checkpoint, rollback and fork for AI-agent sandboxes.

Public API: `Client` and `AsyncClient` (and their `Sandbox` objects) talk to
the daemon over gRPC; the exceptions in `deltabox.errors` are raised on both
sides alike.
"""

__version__ = "0.1.0"

from deltabox.client import (AsyncClient, AsyncProcess, AsyncSandbox, Client,  # noqa: E402
                             ExecResult, Process, ProcessOutput, Sandbox)
from deltabox.errors import *  # noqa: E402,F401,F403
from deltabox.errors import __all__ as _errors_all  # noqa: E402

__all__ = ["__version__", "Client", "AsyncClient", "Sandbox", "AsyncSandbox", "ExecResult",
           "Process", "AsyncProcess", "ProcessOutput", *_errors_all]
