"""Python client for the DeltaBox daemon: `Client` (blocking) and `AsyncClient` (asyncio).

    with deltabox.Client() as client:
        with client.create("tiny") as sbx:          # destroyed on exit
            r = sbx.exec(["echo", "hi"])
            assert r.stdout == b"hi\\n"
            sh = sbx.open_session("sh")
            sh.run("X=5"); assert sh.run("echo $X").stdout == b"5\\n"

Each call is described once (`_Op`: which RPC, the request, how to read the
reply); the two clients differ only in how they invoke it. Errors arrive as
the same exception classes the daemon raised (`deltabox.errors`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import grpc

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc
from deltabox.errors import ERROR_METADATA_KEY, DeltaboxError, SessionNotFound, error_for_code

__all__ = ["Client", "AsyncClient", "Sandbox", "AsyncSandbox", "Session", "AsyncSession",
           "Process", "AsyncProcess", "ProcessOutput",
           "ExecResult", "SessionResult", "RollbackResult", "ForkChild", "default_target",
           "read_token_file", "load_token", "TOKEN_ENV"]

_NETWORK = {"none": pb.NETWORK_MODE_NONE, "nat": pb.NETWORK_MODE_NAT}
_SESSION_KIND = {"bash": pb.SESSION_KIND_BASH, "sh": pb.SESSION_KIND_SH,
                 "python": pb.SESSION_KIND_PYTHON}
_MAX_MESSAGE = 80 << 20


def default_target(socket: str | os.PathLike | None = None) -> str:
    path = socket or os.environ.get("DELTABOX_SOCKET", "/run/deltabox/deltabox.sock")
    path = str(path)
    return path if ":" in path and not path.startswith("/") else f"unix:{path}"


# ---- the TCP bearer token -------------------------------------------------------------------
# Never a command-line argument: any host user can read /proc/<pid>/cmdline.

TOKEN_ENV = "DELTABOX_TOKEN"


def _check_token(token: str, source: str) -> str:
    # gRPC sends it as "authorization: Bearer <token>": printable ASCII, no spaces.
    if not token or not all("!" <= ch <= "~" for ch in token):
        raise ValueError(f"the bearer token from {source} must be non-empty printable ASCII "
                         "without spaces")
    return token


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token in `path`, less one trailing newline. The file must be a regular
    file owned by us (or root) that group and others cannot access (chmod 600)."""
    path = os.path.expanduser(path)
    try:
        # O_NONBLOCK: a fifo must not hang us; the checks below are on what was opened.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"cannot open the token file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"the token file {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ValueError(f"the token file {path} belongs to uid {st.st_uid}, "
                             f"not to us (uid {os.geteuid()}) or root")
        if st.st_mode & 0o077:
            raise ValueError(f"the token file {path} is accessible by group or others "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise ValueError(f"the token file {path} is longer than 4 KiB")
    try:
        token = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"the token file {path} is not ASCII") from None
    return _check_token(token.removesuffix("\n"), str(path))


def load_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token from `token_file`, else from $DELTABOX_TOKEN, else None."""
    if token_file is not None:
        return read_token_file(token_file)
    token = os.environ.get(TOKEN_ENV)
    return _check_token(token, f"${TOKEN_ENV}") if token else None


def _import_source(source: str | os.PathLike) -> str:
    """The source as an absolute path (relative ones are the caller's, resolved here).
    An empty one is refused: Path("") would be the current directory."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path (str or os.PathLike), not "
                        f"{type(source).__name__}")
    if not os.fspath(source):
        raise ValueError("source is required: the path of an image archive or directory")
    return str(Path(source).resolve())


def _error(e: grpc.RpcError) -> DeltaboxError:
    """The exception the daemon raised: its code's class, or its domain class when the
    daemon named one in the trailing metadata (errors.ERROR_METADATA_KEY)."""
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    domain = next((v for k, v in trailers or () if k == ERROR_METADATA_KEY), "")
    return error_for_code(e.code().name, e.details() or e.code().name, domain)


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int = 0
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    pid: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> "ExecResult":
        """Raise CalledProcessError-like DeltaboxError unless the command succeeded."""
        if self.exit_code != 0:
            raise DeltaboxError(f"command failed with exit code {self.exit_code} "
                                f"(signal {self.signal}): {self.stderr[-2000:]!r}")
        return self


@dataclass
class SessionResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float


@dataclass(frozen=True)
class _Op:
    """One RPC: service, method, request and how to turn the reply into a result."""
    service: str
    method: str
    request: Any
    parse: Callable[[Any], Any] = field(default=lambda r: r)


# ---- request builders, shared by both clients ----------------------------------------------

def _create_op(image: str, name: str, memory: int, pids: int, cpus: float, network: str,
               env: dict | None, hostname: str, disk: int = 0, disk_inodes: int = 0) -> _Op:
    if network not in _NETWORK:
        raise ValueError(f"network must be one of {sorted(_NETWORK)}")
    return _Op("sandboxes", "CreateSandbox", pb.CreateSandboxRequest(
        image=image, name=name or "", limits=pb.Limits(memory_bytes=memory, pids=pids,
                                                       cpus=cpus, disk_bytes=disk,
                                                       disk_inodes=disk_inodes),
        network=_NETWORK[network], env=env or {}, hostname=hostname or ""))


def _exec_request(sandbox: str, cmd: list[str] | str, env: dict | None, cwd: str,
                  stdin: bytes | str, timeout: float, max_output: int,
                  detach: bool = False) -> pb.ExecRequest:
    if isinstance(stdin, str):
        stdin = stdin.encode()
    req = pb.ExecRequest(sandbox=sandbox, env=env or {}, cwd=cwd or "", stdin=stdin,
                         timeout_seconds=timeout or 0, max_output_bytes=max_output or 0,
                         detach=detach)
    if isinstance(cmd, str):
        req.shell = cmd
    else:
        req.argv.extend(cmd)
    return req


class _ExecCollector:
    def __init__(self):
        self.out, self.err, self.pid, self.exit = [], [], 0, None

    def add(self, ev: pb.ExecEvent) -> None:
        which = ev.WhichOneof("event")
        if which == "stdout":
            self.out.append(ev.stdout)
        elif which == "stderr":
            self.err.append(ev.stderr)
        elif which == "started":
            self.pid = ev.started.pid
        elif which == "exit":
            self.exit = ev.exit

    def result(self) -> ExecResult:
        if self.exit is None:
            raise DeltaboxError("exec stream ended without an exit status")
        x = self.exit
        return ExecResult(x.exit_code, b"".join(self.out), b"".join(self.err), x.signal,
                          x.timed_out, x.stdout_truncated, x.stderr_truncated,
                          x.duration_seconds, self.pid)


@dataclass
class ProcessOutput:
    """What a detached process's logs hold: the newest 1 MiB of each stream (stdout and
    stderr apart: their interleaving is not kept), and its status once it has ended."""
    stdout: bytes
    stderr: bytes
    exit_code: int | None = None   # None while it runs; -1 if killed by a signal
    signal: int = 0
    stdout_truncated: bool = False  # older output was dropped
    stderr_truncated: bool = False

    @property
    def running(self) -> bool:
        return self.exit_code is None


class _LogCollector(_ExecCollector):
    def output(self) -> ProcessOutput:
        x = self.exit
        if x is None:
            return ProcessOutput(b"".join(self.out), b"".join(self.err))
        return ProcessOutput(b"".join(self.out), b"".join(self.err), x.exit_code, x.signal,
                             x.stdout_truncated, x.stderr_truncated)


def _process_request(sandbox: str, process: str, kind=pb.ProcessRequest, **kw):
    return kind(sandbox=sandbox, process=process, **kw)


def _started_process(ev: pb.ExecEvent) -> tuple[str, int]:
    if ev.WhichOneof("event") != "started" or not ev.started.process:
        raise DeltaboxError("a detached exec did not return a process handle")
    return ev.started.process, ev.started.pid


@dataclass
class RollbackResult:
    sandbox: pb.Sandbox
    # "double" / "standby": a ready incarnation was swapped in; "double-waited" /
    # "standby-waited": it was still being built and the rollback waited for it;
    # "restore" (CRIU) / "fresh" (a new init): none was ready.
    path: str
    timings_ms: dict


@dataclass
class ForkChild:
    """One child of a fork: `sandbox` on success, else `error` (a DeltaboxError)."""
    sandbox: Any = None
    error: DeltaboxError | None = None


def _checkpoint_op(sandbox: str, label: str, full: bool, wait_ready: bool = False) -> _Op:
    return _Op("checkpoints", "Checkpoint", pb.CheckpointRequest(
        sandbox=sandbox, label=label, wait_ready=wait_ready,
        mode=pb.CHECKPOINT_MODE_FULL if full else pb.CHECKPOINT_MODE_FS))


def _rollback_op(sandbox: str, checkpoint: str) -> _Op:
    return _Op("checkpoints", "Rollback", pb.RollbackRequest(
        sandbox=sandbox, checkpoint=_ckpt_id(checkpoint)),
        lambda r: RollbackResult(r.sandbox, r.path, dict(r.timings_ms)))


def _ckpt_id(checkpoint) -> str:
    return checkpoint.id if isinstance(checkpoint, pb.CheckpointInfo) else checkpoint


def _fork_op(checkpoint, n: int) -> _Op:
    return _Op("checkpoints", "Fork", pb.ForkRequest(checkpoint=_ckpt_id(checkpoint), n=n))


class ForkResult(list):
    """The children of a fork (a list of ForkChild), plus the daemon's timings."""
    timings_ms: dict = {}


def _fork_children(reply: pb.ForkResponse, wrap) -> ForkResult:
    out = ForkResult(ForkChild(sandbox=wrap(c.sandbox)) if not c.error_code
                     else ForkChild(error=error_for_code(c.error_code, c.error))
                     for c in reply.children)
    out.timings_ms = dict(reply.timings_ms)
    return out


def _warm_op(checkpoint, n: int, wait: bool) -> _Op:
    return _Op("checkpoints", "Warm", pb.WarmRequest(checkpoint=_ckpt_id(checkpoint), n=n,
                                                     wait=wait), lambda r: r.ready)


def _diff_op(a, b) -> _Op:
    return _Op("checkpoints", "Diff", pb.DiffRequest(**{"from": _ckpt_id(a), "to": _ckpt_id(b)}),
               lambda r: [(e.path, e.change) for e in r.entries])


def _session_kind(kind: str) -> int:
    if kind not in _SESSION_KIND:
        raise ValueError(f"session kind must be one of {sorted(_SESSION_KIND)}, not {kind!r}")
    return _SESSION_KIND[kind]


def _session_result(r: pb.RunInSessionResponse) -> SessionResult:
    return SessionResult(r.exit_code, r.stdout, r.stderr, r.duration_seconds)


def _stubs(channel) -> dict[str, Any]:
    return {"images": pb_grpc.ImagesStub(channel), "sandboxes": pb_grpc.SandboxesStub(channel),
            "checkpoints": pb_grpc.CheckpointsStub(channel), "system": pb_grpc.SystemStub(channel)}


def _channel_options() -> list:
    return [("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE)]


def _credentials(tls_ca: str | os.PathLike | None, token: str | None):
    """TLS (+ bearer token) credentials for a TCP daemon, or None for the unix socket."""
    if tls_ca is None:
        if token:
            raise ValueError("a token is only sent over TLS: give tls_ca too")
        return None
    creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    if token:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token))
    return creds


def _open_channel(module, target: str, tls_ca, token, token_file):
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token is not None:
        token = _check_token(token, "the token argument")
    elif token_file is not None:
        token = read_token_file(token_file)
    elif tls_ca is not None:
        token = load_token()  # $DELTABOX_TOKEN: only TCP (TLS) connections send one
    creds = _credentials(tls_ca, token)
    if creds is None:
        return module.insecure_channel(target, options=_channel_options())
    return module.secure_channel(target, creds, options=_channel_options())


# ---- blocking client ---------------------------------------------------------------------

class Client:
    """Blocking client. `socket`: a unix socket path (default), or host:port of a daemon
    listening on TCP, which needs `tls_ca` (its certificate or CA) and its bearer token:
    `token_file` (a chmod-600 file), `token`, or else $DELTABOX_TOKEN."""

    def __init__(self, socket: str | os.PathLike | None = None, *, timeout: float | None = None,
                 tls_ca: str | os.PathLike | None = None, token: str | None = None,
                 token_file: str | os.PathLike | None = None):
        self.target = default_target(socket)
        self.timeout = timeout
        self._channel = _open_channel(grpc, self.target, tls_ca, token, token_file)
        self._stubs = _stubs(self._channel)

    def _call(self, op: _Op):
        try:
            reply = getattr(self._stubs[op.service], op.method)(op.request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None
        return op.parse(reply)

    def _stream(self, service: str, method: str, request) -> Iterator:
        try:
            yield from getattr(self._stubs[service], method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # images
    def import_image(self, name: str, source: str | os.PathLike, replace: bool = False,
                     progress: Callable[[pb.ImportImageProgress], None] | None = None) -> pb.Image:
        req = pb.ImportImageRequest(name=name, source=_import_source(source), replace=replace)
        final = None
        for msg in self._stream("images", "ImportImage", req):
            if progress:
                progress(msg)
            if msg.HasField("image"):
                final = msg.image
        return final

    def list_images(self) -> list[pb.Image]:
        return self._call(_Op("images", "ListImages", pb.ListImagesRequest(),
                              lambda r: list(r.images)))

    def remove_image(self, name: str) -> None:
        self._call(_Op("images", "RemoveImage", pb.RemoveImageRequest(name=name)))

    # sandboxes
    def create(self, image: str, name: str = "", *, memory: int = 0, pids: int = 0,
               cpus: float = 0.0, network: str = "none", env: dict | None = None,
               hostname: str = "", disk: int = 0, disk_inodes: int = 0) -> "Sandbox":
        """`disk`: bytes the sandbox may write into the store (0 = the daemon's
        default); `disk_inodes`: files it may create (0 = one per KiB of `disk`)."""
        info = self._call(_create_op(image, name, memory, pids, cpus, network, env, hostname,
                                     disk, disk_inodes))
        return Sandbox(self, info)

    def get(self, sandbox: str) -> "Sandbox":
        return Sandbox(self, self._call(_Op("sandboxes", "GetSandbox",
                                            pb.GetSandboxRequest(sandbox=sandbox))))

    def list(self) -> list["Sandbox"]:
        reply = self._call(_Op("sandboxes", "ListSandboxes", pb.ListSandboxesRequest()))
        return [Sandbox(self, s) for s in reply.sandboxes]

    def status(self) -> pb.StatusResponse:
        return self._call(_Op("system", "Status", pb.StatusRequest()))

    # checkpoints
    def fork(self, checkpoint, n: int = 1) -> "ForkResult":
        """n new sandboxes from a checkpoint; one ForkChild per child."""
        return _fork_children(self._call(_fork_op(checkpoint, n)),
                              lambda info: Sandbox(self, info))

    def warm(self, checkpoint, n: int, wait: bool = False) -> int:
        """Hint: prepare n incarnations of a checkpoint for a coming fork; returns how
        many are ready (all of them when `wait`)."""
        return self._call(_warm_op(checkpoint, n, wait))

    def diff(self, a, b) -> list[tuple[str, str]]:
        """(path, added|modified|deleted) between checkpoints (or a live sandbox)."""
        return self._call(_diff_op(a, b))

    def delete_checkpoint(self, checkpoint, cascade: bool = False) -> None:
        self._call(_Op("checkpoints", "DeleteCheckpoint", pb.DeleteCheckpointRequest(
            checkpoint=_ckpt_id(checkpoint), cascade=cascade)))

    def pin_checkpoint(self, checkpoint, pinned: bool = True) -> pb.CheckpointInfo:
        return self._call(_Op("checkpoints", "PinCheckpoint", pb.PinCheckpointRequest(
            checkpoint=_ckpt_id(checkpoint), pinned=pinned)))

    def stats(self) -> pb.StatsResponse:
        return self._call(_Op("system", "Stats", pb.StatsRequest()))


class Sandbox:
    """A sandbox handle; a context manager that destroys the sandbox on exit."""

    def __init__(self, client: Client, info: pb.Sandbox):
        self._client = client
        self.info = info

    id = property(lambda self: self.info.id)
    name = property(lambda self: self.info.name)

    def __repr__(self) -> str:
        return f"<Sandbox {self.info.id} {self.info.name!r}>"

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def refresh(self) -> "Sandbox":
        self.info = self._client.get(self.info.id).info
        return self

    def destroy(self) -> None:
        self._client._call(_Op("sandboxes", "DestroySandbox",
                               pb.DestroySandboxRequest(sandbox=self.info.id)))

    def exec_stream(self, cmd: list[str] | str, *, env: dict | None = None, cwd: str = "",
                    stdin: bytes | str = b"", timeout: float = 0,
                    max_output: int = 0) -> Iterator[pb.ExecEvent]:
        """Events as they happen: started, stdout/stderr chunks, exit."""
        req = _exec_request(self.info.id, cmd, env, cwd, stdin, timeout, max_output)
        return self._client._stream("sandboxes", "Exec", req)

    def exec(self, cmd: list[str] | str, *, detach: bool = False, **kw):
        """Run a command (argv list, or a string for /bin/sh -c) and wait for it: an
        ExecResult. What it leaves running in the background keeps running.
        `detach=True`: start it and return a `Process` handle at once (env, cwd and stdin
        apply; timeout and max_output do not)."""
        if detach:
            req = _exec_request(self.info.id, cmd, kw.pop("env", None), kw.pop("cwd", ""),
                                kw.pop("stdin", b""), kw.pop("timeout", 0),
                                kw.pop("max_output", 0), detach=True)
            if kw:
                raise TypeError(f"unexpected arguments {sorted(kw)}")
            (started,) = list(self._client._stream("sandboxes", "Exec", req))
            process_id, pid = _started_process(started)
            return Process(self, pb.Process(sandbox_id=self.info.id, id=process_id, pid=pid,
                                            running=True))
        col = _ExecCollector()
        for ev in self.exec_stream(cmd, **kw):
            col.add(ev)
        return col.result()

    def processes(self) -> list[pb.Process]:
        """Its detached execs (running, and the last ended ones), oldest first."""
        return self._client._call(_Op("sandboxes", "ListProcesses", pb.ListProcessesRequest(
            sandbox=self.info.id), lambda r: list(r.processes)))

    def process(self, process_id: str) -> "Process":
        """A handle on a detached exec (e.g. started before a client restart)."""
        return Process(self, self._client._call(_Op(
            "sandboxes", "GetProcess", _process_request(self.info.id, process_id))))

    def open_session(self, kind: str = "bash", name: str = "", *, env: dict | None = None,
                     cwd: str = "") -> "Session":
        info = self._client._call(_Op("sandboxes", "OpenSession", pb.OpenSessionRequest(
            sandbox=self.info.id, name=name, kind=_session_kind(kind), env=env or {},
            cwd=cwd)))
        return Session(self, info)

    def list_sessions(self) -> list[pb.Session]:
        return self._client._call(_Op("sandboxes", "ListSessions", pb.ListSessionsRequest(
            sandbox=self.info.id), lambda r: list(r.sessions)))

    def session(self, name: str) -> "Session":
        """A handle on an existing session (e.g. opened before a client restart)."""
        for s in self.list_sessions():
            if s.name == name:
                return Session(self, s)
        raise SessionNotFound(f"no session {name!r}")

    # files
    def read_file(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        return self._client._call(_Op("sandboxes", "ReadFile", pb.ReadFileRequest(
            sandbox=self.info.id, path=path, offset=offset, length=length), lambda r: r.data))

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0, append: bool = False,
                   make_parents: bool = False) -> int:
        if isinstance(data, str):
            data = data.encode()
        return self._client._call(_Op("sandboxes", "WriteFile", pb.WriteFileRequest(
            sandbox=self.info.id, path=path, data=data, mode=mode, append=append,
            make_parents=make_parents), lambda r: r.size))

    def list_dir(self, path: str = "/") -> list[pb.FileInfo]:
        return self._client._call(_Op("sandboxes", "ListDir", pb.ListDirRequest(
            sandbox=self.info.id, path=path), lambda r: list(r.entries)))

    def stat(self, path: str) -> pb.FileInfo:
        return self._client._call(_Op("sandboxes", "StatPath", pb.StatPathRequest(
            sandbox=self.info.id, path=path)))

    def remove(self, path: str, recursive: bool = False) -> None:
        self._client._call(_Op("sandboxes", "RemovePath", pb.RemovePathRequest(
            sandbox=self.info.id, path=path, recursive=recursive)))

    def mkdir(self, path: str, parents: bool = False, mode: int = 0) -> None:
        self._client._call(_Op("sandboxes", "MakeDir", pb.MakeDirRequest(
            sandbox=self.info.id, path=path, parents=parents, mode=mode)))

    # checkpoints (DeltaFS / DeltaCR)
    def checkpoint(self, label: str = "", full: bool = False,
                   wait_ready: bool = False) -> pb.CheckpointInfo:
        """An immutable checkpoint of the sandbox; it keeps running undisturbed. With
        `wait_ready`, returns once its body double (full) / standby (fs) is built:
        `.ready` then says whether a rollback to it takes the fast path."""
        return self._client._call(_checkpoint_op(self.info.id, label, full, wait_ready))

    def rollback(self, checkpoint) -> RollbackResult:
        """Back to a checkpoint of this sandbox's tree (same id, limits and network)."""
        res = self._client._call(_rollback_op(self.info.id, checkpoint))
        self.info = res.sandbox
        return res

    def checkpoints(self) -> list[pb.CheckpointInfo]:
        """This sandbox's checkpoint tree (with ancestors), oldest first."""
        return self._client._call(_Op("checkpoints", "ListCheckpoints",
                                      pb.ListCheckpointsRequest(sandbox=self.info.id),
                                      lambda r: list(r.checkpoints)))

    def diff(self, checkpoint) -> list[tuple[str, str]]:
        """What changed in the live sandbox since `checkpoint`."""
        return self._client.diff(checkpoint, self.info.id)


class Session:
    """A persistent bash/sh/python session inside a sandbox."""

    def __init__(self, sandbox: Sandbox, info: pb.Session):
        self.sandbox = sandbox
        self.info = info

    name = property(lambda self: self.info.name)

    def run(self, code: str, timeout: float = 0) -> SessionResult:
        return self.sandbox._client._call(_Op("sandboxes", "RunInSession",
                                              pb.RunInSessionRequest(
                                                  sandbox=self.sandbox.id, session=self.name,
                                                  code=code, timeout_seconds=timeout),
                                              _session_result))

    def close(self) -> None:
        self.sandbox._client._call(_Op("sandboxes", "CloseSession", pb.CloseSessionRequest(
            sandbox=self.sandbox.id, session=self.name)))

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Process:
    """A detached exec (`sandbox.exec(cmd, detach=True)`): owned by the sandbox's init,
    it outlives this handle, the client and the daemon's restarts."""

    def __init__(self, sandbox: Sandbox, info: pb.Process):
        self.sandbox = sandbox
        self.info = info

    id = property(lambda self: self.info.id)
    pid = property(lambda self: self.info.pid)

    def __repr__(self) -> str:
        return f"<Process {self.info.id} pid {self.info.pid} in {self.sandbox.id}>"

    def _call(self, method: str, request) -> pb.Process:
        self.info = self.sandbox._client._call(_Op("sandboxes", method, request))
        return self.info

    def refresh(self) -> pb.Process:
        return self._call("GetProcess", _process_request(self.sandbox.id, self.id))

    def logs_stream(self, follow: bool = False) -> Iterator[pb.ExecEvent]:
        """stdout and stderr chunks (what is kept, then, with follow, live output), and
        `exit` once it has ended."""
        return self.sandbox._client._stream("sandboxes", "ProcessLogs", _process_request(
            self.sandbox.id, self.id, pb.ProcessLogsRequest, follow=follow))

    def logs(self, follow: bool = False) -> ProcessOutput:
        """Its kept output; with follow, everything until it ends."""
        col = _LogCollector()
        for ev in self.logs_stream(follow):
            col.add(ev)
        return col.output()

    def signal(self, sig: int = 15) -> pb.Process:
        """Signal its process group (default SIGTERM); FailedPrecondition once it ended."""
        return self._call("SignalProcess", _process_request(
            self.sandbox.id, self.id, pb.SignalProcessRequest, signal=int(sig)))

    def kill(self) -> pb.Process:
        return self.signal(9)

    def wait(self, timeout: float = 0) -> pb.Process:
        """Until it ends (DeadlineExceeded after `timeout` seconds; 0 = no limit)."""
        return self._call("WaitProcess", _process_request(
            self.sandbox.id, self.id, pb.WaitProcessRequest, timeout_seconds=timeout or 0))


# ---- asyncio client ----------------------------------------------------------------------

class AsyncClient:
    """asyncio client with the same methods as `Client`, as coroutines."""

    def __init__(self, socket: str | os.PathLike | None = None, *, timeout: float | None = None,
                 tls_ca: str | os.PathLike | None = None, token: str | None = None,
                 token_file: str | os.PathLike | None = None):
        self.target = default_target(socket)
        self.timeout = timeout
        self._channel = _open_channel(grpc.aio, self.target, tls_ca, token, token_file)
        self._stubs = _stubs(self._channel)

    async def _call(self, op: _Op):
        try:
            reply = await getattr(self._stubs[op.service], op.method)(op.request,
                                                                     timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None
        return op.parse(reply)

    async def _stream(self, service: str, method: str, request) -> AsyncIterator:
        try:
            async for item in getattr(self._stubs[service], method)(request,
                                                                     timeout=self.timeout):
                yield item
        except grpc.RpcError as e:
            raise _error(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def list_images(self) -> list[pb.Image]:
        return await self._call(_Op("images", "ListImages", pb.ListImagesRequest(),
                                    lambda r: list(r.images)))

    async def create(self, image: str, name: str = "", *, memory: int = 0, pids: int = 0,
                     cpus: float = 0.0, network: str = "none", env: dict | None = None,
                     hostname: str = "", disk: int = 0,
                     disk_inodes: int = 0) -> "AsyncSandbox":
        info = await self._call(_create_op(image, name, memory, pids, cpus, network, env,
                                           hostname, disk, disk_inodes))
        return AsyncSandbox(self, info)

    async def get(self, sandbox: str) -> "AsyncSandbox":
        return AsyncSandbox(self, await self._call(_Op("sandboxes", "GetSandbox",
                                                       pb.GetSandboxRequest(sandbox=sandbox))))

    async def list(self) -> list["AsyncSandbox"]:
        reply = await self._call(_Op("sandboxes", "ListSandboxes", pb.ListSandboxesRequest()))
        return [AsyncSandbox(self, s) for s in reply.sandboxes]

    async def status(self) -> pb.StatusResponse:
        return await self._call(_Op("system", "Status", pb.StatusRequest()))

    async def fork(self, checkpoint, n: int = 1) -> list[ForkChild]:
        return _fork_children(await self._call(_fork_op(checkpoint, n)),
                              lambda info: AsyncSandbox(self, info))

    async def diff(self, a, b) -> list[tuple[str, str]]:
        return await self._call(_diff_op(a, b))

    async def warm(self, checkpoint, n: int, wait: bool = False) -> int:
        return await self._call(_warm_op(checkpoint, n, wait))


class AsyncSandbox:
    def __init__(self, client: AsyncClient, info: pb.Sandbox):
        self._client = client
        self.info = info

    id = property(lambda self: self.info.id)
    name = property(lambda self: self.info.name)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.destroy()

    async def destroy(self) -> None:
        await self._client._call(_Op("sandboxes", "DestroySandbox",
                                     pb.DestroySandboxRequest(sandbox=self.info.id)))

    def exec_stream(self, cmd: list[str] | str, *, env: dict | None = None, cwd: str = "",
                    stdin: bytes | str = b"", timeout: float = 0,
                    max_output: int = 0) -> AsyncIterator[pb.ExecEvent]:
        req = _exec_request(self.info.id, cmd, env, cwd, stdin, timeout, max_output)
        return self._client._stream("sandboxes", "Exec", req)

    async def exec(self, cmd: list[str] | str, *, detach: bool = False, **kw):
        """As Sandbox.exec: an ExecResult, or with detach=True an AsyncProcess."""
        if detach:
            req = _exec_request(self.info.id, cmd, kw.pop("env", None), kw.pop("cwd", ""),
                                kw.pop("stdin", b""), kw.pop("timeout", 0),
                                kw.pop("max_output", 0), detach=True)
            if kw:
                raise TypeError(f"unexpected arguments {sorted(kw)}")
            events = [ev async for ev in self._client._stream("sandboxes", "Exec", req)]
            if len(events) != 1:
                raise DeltaboxError("a detached exec did not return a process handle")
            process_id, pid = _started_process(events[0])
            return AsyncProcess(self, pb.Process(sandbox_id=self.info.id, id=process_id,
                                                 pid=pid, running=True))
        col = _ExecCollector()
        async for ev in self.exec_stream(cmd, **kw):
            col.add(ev)
        return col.result()

    async def processes(self) -> list[pb.Process]:
        return await self._client._call(_Op("sandboxes", "ListProcesses",
                                            pb.ListProcessesRequest(sandbox=self.info.id),
                                            lambda r: list(r.processes)))

    async def process(self, process_id: str) -> "AsyncProcess":
        return AsyncProcess(self, await self._client._call(_Op(
            "sandboxes", "GetProcess", _process_request(self.info.id, process_id))))

    async def checkpoint(self, label: str = "", full: bool = False,
                         wait_ready: bool = False) -> pb.CheckpointInfo:
        return await self._client._call(_checkpoint_op(self.info.id, label, full, wait_ready))

    async def rollback(self, checkpoint) -> RollbackResult:
        res = await self._client._call(_rollback_op(self.info.id, checkpoint))
        self.info = res.sandbox
        return res

    async def open_session(self, kind: str = "bash", name: str = "", *,
                           env: dict | None = None, cwd: str = "") -> "AsyncSession":
        info = await self._client._call(_Op("sandboxes", "OpenSession", pb.OpenSessionRequest(
            sandbox=self.info.id, name=name, kind=_session_kind(kind), env=env or {},
            cwd=cwd)))
        return AsyncSession(self, info)

    async def read_file(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        return await self._client._call(_Op("sandboxes", "ReadFile", pb.ReadFileRequest(
            sandbox=self.info.id, path=path, offset=offset, length=length), lambda r: r.data))

    async def write_file(self, path: str, data: bytes | str, *, mode: int = 0,
                         append: bool = False, make_parents: bool = False) -> int:
        if isinstance(data, str):
            data = data.encode()
        return await self._client._call(_Op("sandboxes", "WriteFile", pb.WriteFileRequest(
            sandbox=self.info.id, path=path, data=data, mode=mode, append=append,
            make_parents=make_parents), lambda r: r.size))


class AsyncSession:
    def __init__(self, sandbox: AsyncSandbox, info: pb.Session):
        self.sandbox = sandbox
        self.info = info

    name = property(lambda self: self.info.name)

    async def run(self, code: str, timeout: float = 0) -> SessionResult:
        return await self.sandbox._client._call(_Op(
            "sandboxes", "RunInSession", pb.RunInSessionRequest(
                sandbox=self.sandbox.id, session=self.name, code=code, timeout_seconds=timeout),
            _session_result))

    async def close(self) -> None:
        await self.sandbox._client._call(_Op("sandboxes", "CloseSession", pb.CloseSessionRequest(
            sandbox=self.sandbox.id, session=self.name)))


class AsyncProcess:
    """As Process, for AsyncSandbox."""

    def __init__(self, sandbox: AsyncSandbox, info: pb.Process):
        self.sandbox = sandbox
        self.info = info

    id = property(lambda self: self.info.id)
    pid = property(lambda self: self.info.pid)

    async def _call(self, method: str, request) -> pb.Process:
        self.info = await self.sandbox._client._call(_Op("sandboxes", method, request))
        return self.info

    async def refresh(self) -> pb.Process:
        return await self._call("GetProcess", _process_request(self.sandbox.id, self.id))

    def logs_stream(self, follow: bool = False) -> AsyncIterator[pb.ExecEvent]:
        return self.sandbox._client._stream("sandboxes", "ProcessLogs", _process_request(
            self.sandbox.id, self.id, pb.ProcessLogsRequest, follow=follow))

    async def logs(self, follow: bool = False) -> ProcessOutput:
        col = _LogCollector()
        async for ev in self.logs_stream(follow):
            col.add(ev)
        return col.output()

    async def signal(self, sig: int = 15) -> pb.Process:
        return await self._call("SignalProcess", _process_request(
            self.sandbox.id, self.id, pb.SignalProcessRequest, signal=int(sig)))

    async def kill(self) -> pb.Process:
        return await self.signal(9)

    async def wait(self, timeout: float = 0) -> pb.Process:
        return await self._call("WaitProcess", _process_request(
            self.sandbox.id, self.id, pb.WaitProcessRequest, timeout_seconds=timeout or 0))
