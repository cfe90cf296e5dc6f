"""The operation table: every call of the client, described once.

An `Operation` names the handle that offers it (`client`, `sandbox`, `session`,
`process`), its method name, the gRPC service and RPC, how its reply arrives (`shape`),
whether it may be retried (`idempotent`) and a *builder*. The builder is a plain function
whose signature is the method's (its first parameter is the handle) and which returns a
`Call`: the request message, the call's own deadline, and how to turn the reply into the
result (`results.py` dataclasses, or handles). `sync.py` and `aio.py` generate their
classes' methods from this table, so the blocking and the asyncio client cannot drift
apart; only the waiting differs.

Shapes:
    unary   one request, one reply
    fold    a server stream folded into one result (exec, logs, import) by a `Folder`
    iter    a server stream handed to the caller item by item (exec_stream, logs_stream)
    shell   the bidirectional terminal stream (an interactive `Shell` object)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.client import results as r
from deltabox.client.connection import DEFAULT, EXEC_GRACE
from deltabox.errors import DeltaboxError, InvalidArgument, SessionNotFound, error_for_code
from deltabox.types import CheckpointMode, NetworkMode, SessionKind

__all__ = ["Operation", "Call", "OPERATIONS", "operations_of"]


@dataclass
class Call:
    """One invocation, built from the caller's arguments."""
    request: Any
    # (handle, reply or folded result) -> what the method returns
    convert: Callable[[Any, Any], Any] = lambda handle, reply: reply
    fold: Callable[[], "Folder"] | None = None   # fold shape: a fresh folder per attempt
    item: Callable[[Any], Any] | None = None     # iter shape: one stream item -> result
    deadline: Any = DEFAULT                      # the call's own limit (None = none)


@dataclass(frozen=True)
class Operation:
    owner: str          # "client" | "sandbox" | "session" | "process"
    name: str           # the method's name
    service: str        # "images" | "sandboxes" | "checkpoints" | "system"
    rpc: str
    build: Callable[..., Call]
    returns: str        # the result's annotation (handle names as the sync client's)
    shape: str = "unary"
    idempotent: bool = False
    # The result is a handle to close (a sandbox, a session): the asyncio method returns
    # an awaitable that is also an async context manager (`async with client.create(...)`).
    closable: bool = False
    doc: str = field(default="")


def _own_deadline(timeout: float) -> float | None:
    """The deadline of a call with a time limit of its own (0 = none)."""
    return timeout + EXEC_GRACE if timeout else None


def _checkpoint_id(checkpoint) -> str:
    return checkpoint.id if isinstance(checkpoint, r.CheckpointInfo) else checkpoint


def _enum_arg(vocabulary, value, what: str):
    try:
        return vocabulary(value)
    except ValueError:
        raise InvalidArgument(f"{what} must be one of {sorted(v.value for v in vocabulary)}, "
                              f"not {value!r}") from None


def _bytes(data: bytes | str, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")
    return bytes(data)


# ---- folders: a server stream into one result ----------------------------------------------------

class Folder:
    def add(self, item) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class ExecFolder(Folder):
    """An exec's (or a process's logs') events, gathered."""

    def __init__(self):
        self.out, self.err, self.count = [], [], 0
        self.started: r.ExecStarted | None = None
        self.exit: r.ExecExit | None = None

    def add(self, item: pb.ExecEvent) -> None:
        # Read straight from the message: an exec's output can be thousands of chunks.
        self.count += 1
        kind = item.WhichOneof("event")
        if kind == "stdout":
            self.out.append(item.stdout)
        elif kind == "stderr":
            self.err.append(item.stderr)
        elif kind == "started":
            self.started = r.ExecStarted(item.started.pid, item.started.process)
        elif kind == "exit":
            self.exit = r.exec_exit_from_pb(item.exit)

    def result(self) -> "ExecFolder":
        return self

    def exec_result(self) -> r.ExecResult:
        x = self.exit
        if x is None:
            raise DeltaboxError("exec stream ended without an exit status")
        return r.ExecResult(x.exit_code, b"".join(self.out), b"".join(self.err), x.signal,
                            x.timed_out, x.stdout_truncated, x.stderr_truncated,
                            x.duration_seconds, self.started.pid if self.started else 0)

    def output(self) -> r.ProcessOutput:
        x = self.exit
        if x is None:
            return r.ProcessOutput(b"".join(self.out), b"".join(self.err))
        return r.ProcessOutput(b"".join(self.out), b"".join(self.err), x.exit_code, x.signal,
                               x.stdout_truncated, x.stderr_truncated)


class ImportFolder(Folder):
    def __init__(self, progress):
        self.progress, self.image = progress, None

    def add(self, item: pb.ImportImageProgress) -> None:
        p = r.import_progress_from_pb(item)
        if self.progress:
            self.progress(p)
        if p.image is not None:
            self.image = p.image

    def result(self):
        return self.image


# ---- client ----------------------------------------------------------------------------------

def import_image(h, name: str, source: str | os.PathLike, replace: bool = False,
                 progress: Callable[[r.ImportProgress], None] | None = None) -> Call:
    """Import an image from a path on the daemon's host (below one of its --image-dir):
    a rootfs tarball, a directory, a `docker save` archive or an OCI layout. `progress`
    is called with each ImportProgress."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path (str or os.PathLike), not "
                        f"{type(source).__name__}")
    if not os.fspath(source):  # Path("") would be the current directory
        raise InvalidArgument("source is required: the path of an image archive or directory")
    req = pb.ImportImageRequest(name=name, source=str(Path(source).resolve()), replace=replace)
    return Call(req, fold=lambda: ImportFolder(progress), deadline=None)


def list_images(h) -> Call:
    return Call(pb.ListImagesRequest(),
                lambda h, m: [r.image_from_pb(i) for i in m.images])


def remove_image(h, name: str) -> Call:
    """Remove an image no sandbox uses."""
    return Call(pb.RemoveImageRequest(name=name), lambda h, m: None)


def create(h, image: str, name: str = "", *, memory: int = 0, pids: int = 0,
           cpus: float = 0.0, network: str = "none", env: dict | None = None,
           hostname: str = "", disk: int = 0, disk_inodes: int = 0) -> Call:
    """Create and start a sandbox. `disk`: bytes it may write into the store (0 = the
    daemon's default); `disk_inodes`: files it may create (0 = one per KiB of `disk`)."""
    mode = _enum_arg(NetworkMode, network, "network")
    req = pb.CreateSandboxRequest(
        image=image, name=name or "", limits=pb.Limits(
            memory_bytes=memory, pids=pids, cpus=cpus, disk_bytes=disk,
            disk_inodes=disk_inodes),
        network=pb.NetworkMode.Value(f"NETWORK_MODE_{mode.name}"), env=env or {},
        hostname=hostname or "")
    return Call(req, lambda h, m: h._family.Sandbox(h, r.sandbox_from_pb(m)))


def get(h, sandbox: str) -> Call:
    """A handle on a sandbox, by id or name."""
    return Call(pb.GetSandboxRequest(sandbox=sandbox),
                lambda h, m: h._family.Sandbox(h, r.sandbox_from_pb(m)))


def list_sandboxes(h) -> Call:
    return Call(pb.ListSandboxesRequest(),
                lambda h, m: [h._family.Sandbox(h, r.sandbox_from_pb(s)) for s in m.sandboxes])


def status(h) -> Call:
    """The daemon's version, store and counts."""
    return Call(pb.StatusRequest(), lambda h, m: r.status_from_pb(m))


def stats(h) -> Call:
    """Per-operation latencies and the Prometheus text."""
    return Call(pb.StatsRequest(), lambda h, m: r.stats_from_pb(m))


def fork(h, checkpoint: str | r.CheckpointInfo, n: int = 1) -> Call:
    """n new sandboxes from a checkpoint; one ForkChild per child, in order."""
    def convert(h, m):
        return r.ForkResult(
            (r.ForkChild(sandbox=h._family.Sandbox(h, r.sandbox_from_pb(c.sandbox)))
             if not c.error_code else r.ForkChild(error=_child_error(c))
             for c in m.children), dict(m.timings_ms))
    return Call(pb.ForkRequest(checkpoint=_checkpoint_id(checkpoint), n=n), convert)


def _child_error(c: pb.ForkResult) -> DeltaboxError:
    return error_for_code(c.error_code, c.error)


def warm(h, checkpoint: str | r.CheckpointInfo, n: int, wait: bool = False) -> Call:
    """Hint: prepare n incarnations of a checkpoint for a coming fork; returns how many
    are ready (all of them when `wait`)."""
    return Call(pb.WarmRequest(checkpoint=_checkpoint_id(checkpoint), n=n, wait=wait),
                lambda h, m: m.ready, deadline=None if wait else DEFAULT)


def diff(h, a: str | r.CheckpointInfo, b: str | r.CheckpointInfo) -> Call:
    """(path, change) between two checkpoints, or a checkpoint and a live sandbox."""
    return Call(pb.DiffRequest(**{"from": _checkpoint_id(a), "to": _checkpoint_id(b)}),
                lambda h, m: r.diff_from_pb(m))


def wait_checkpoint(h, checkpoint: str | r.CheckpointInfo) -> Call:
    """Wait until a (background) checkpoint is recorded; its final CheckpointInfo, or
    the error its recording hit."""
    return Call(pb.WaitCheckpointRequest(checkpoint=_checkpoint_id(checkpoint)),
                lambda h, m: r.checkpoint_from_pb(m))


def delete_checkpoint(h, checkpoint: str | r.CheckpointInfo, cascade: bool = False) -> Call:
    return Call(pb.DeleteCheckpointRequest(checkpoint=_checkpoint_id(checkpoint),
                                           cascade=cascade), lambda h, m: None)


def pin_checkpoint(h, checkpoint: str | r.CheckpointInfo, pinned: bool = True) -> Call:
    return Call(pb.PinCheckpointRequest(checkpoint=_checkpoint_id(checkpoint), pinned=pinned),
                lambda h, m: r.checkpoint_from_pb(m))


def shell(h, sandbox: str, argv: list[str] | None = None, *, env: dict | None = None,
          rows: int = 24, cols: int = 80) -> Call:
    """An interactive terminal in `sandbox` (bash if present, else sh): send it input,
    read its output, `exit` once it ends."""
    return Call(pb.ShellInput(start=pb.ShellStart(sandbox=sandbox, argv=argv or [],
                                                  env=env or {}, rows=rows, cols=cols)),
                deadline=None)


# ---- batched calls (one RPC, one result or error per item; see the .proto) --------------------

def _sandbox_id(sandbox) -> str:
    return sandbox if isinstance(sandbox, str) else sandbox.id


def checkpoint_many(h, sandboxes: list, label: str = "", full: bool = False,
                    wait_ready: bool = False, *, concurrency: int = 0,
                    rollback_likely: bool | None = None) -> Call:
    """Checkpoint many sandboxes (handles or ids) in one call, concurrently in the daemon
    (at most `concurrency` at a time; 0 = its default): a BatchResult with one BatchItem
    per sandbox, in order, each a CheckpointInfo or the error its own call would raise.
    `rollback_likely`: as `checkpoint`'s, for every item."""
    mode = CheckpointMode.FULL if full else CheckpointMode.FS
    mode_pb = pb.CheckpointMode.Value(f"CHECKPOINT_MODE_{mode.name}")
    likely = {} if rollback_likely is None else {"rollback_likely": bool(rollback_likely)}
    req = pb.CheckpointManyRequest(concurrency=concurrency, items=[
        pb.CheckpointRequest(sandbox=_sandbox_id(s), label=label, mode=mode_pb,
                             wait_ready=wait_ready, **likely) for s in sandboxes])
    return Call(req, lambda h, m: r.batch_from_pb(m, "checkpoint", r.checkpoint_from_pb),
                deadline=None if wait_ready else DEFAULT)


def rollback_many(h, items: list, *, concurrency: int = 0) -> Call:
    """Roll many sandboxes back in one call: `items` are (sandbox, checkpoint) pairs
    (handles or ids). One BatchItem per pair, in order: a RollbackResult or the error its
    own call would raise. A sandbox given as a handle has its `info` updated."""
    pairs = [(s, c) for s, c in items]
    req = pb.RollbackManyRequest(concurrency=concurrency, items=[
        pb.RollbackRequest(sandbox=_sandbox_id(s), checkpoint=_checkpoint_id(c))
        for s, c in pairs])

    def convert(h, m):
        res = r.batch_from_pb(m, "rollback", r.rollback_from_pb)
        for (sandbox, _), item in zip(pairs, res):
            if item.ok and not isinstance(sandbox, str):
                sandbox.info = item.value.sandbox
        return res
    return Call(req, convert)


def exec_many(h, items: list, *, env: dict | None = None, cwd: str = "",
              timeout: float = 0, max_output: int = 0, concurrency: int = 0) -> Call:
    """Run many commands in one call: `items` are (sandbox, cmd) pairs (a handle or id;
    an argv list or a shell string). One BatchItem per pair, in order: an ExecResult or
    the error its own exec would raise. As with exec, only `timeout` (per command)
    limits it."""
    pairs = [(s, c) for s, c in items]
    req = pb.ExecManyRequest(concurrency=concurrency, items=[
        _exec_request(SimpleNamespace(id=_sandbox_id(s)), cmd, env, cwd, b"", timeout,
                      max_output, False) for s, cmd in pairs])
    return Call(req, lambda h, m: r.batch_from_pb(m, "output", r.exec_output_from_pb),
                deadline=None)


# ---- sandbox ---------------------------------------------------------------------------------

def _set_info(h, info):
    h.info = info
    return h


def refresh(h) -> Call:
    """Ask the daemon again (updates and returns this handle)."""
    return Call(pb.GetSandboxRequest(sandbox=h.id),
                lambda h, m: _set_info(h, r.sandbox_from_pb(m)))


def destroy(h) -> Call:
    """Kill its processes and delete it (its checkpoints stay)."""
    return Call(pb.DestroySandboxRequest(sandbox=h.id), lambda h, m: None)


def _exec_request(h, cmd, env, cwd, stdin, timeout, max_output, detach) -> pb.ExecRequest:
    req = pb.ExecRequest(sandbox=h.id, env=env or {}, cwd=cwd or "",
                         stdin=_bytes(stdin, "stdin"), timeout_seconds=timeout or 0,
                         max_output_bytes=max_output or 0, detach=detach)
    if isinstance(cmd, str):
        req.shell = cmd
    else:
        req.argv.extend(cmd)
    return req


def exec_stream(h, cmd: list[str] | str, *, env: dict | None = None, cwd: str = "",
                stdin: bytes | str = b"", timeout: float = 0, max_output: int = 0) -> Call:
    """Events as they happen: started, stdout/stderr chunks, exit (ExecEvent)."""
    return Call(_exec_request(h, cmd, env, cwd, stdin, timeout, max_output, False),
                item=r.exec_event_from_pb, deadline=_own_deadline(timeout))


def exec_(h, cmd: list[str] | str, *, env: dict | None = None, cwd: str = "",
          stdin: bytes | str = b"", timeout: float = 0, max_output: int = 0,
          detach: bool = False) -> Call:
    """Run a command (argv list, or a string for /bin/sh -c) and wait for it: an
    ExecResult. What it leaves running in the background keeps running. Only `timeout`
    limits it (not the client's default deadline). `detach=True`: start it and return a
    `Process` handle at once (env, cwd and stdin apply; timeout and max_output must be 0)."""
    def convert(h, folded: ExecFolder):
        if not detach:
            return folded.exec_result()
        started = folded.started
        if folded.count != 1 or started is None or not started.process:
            raise DeltaboxError("a detached exec did not return a process handle")
        return h._family.Process(h, r.ProcessInfo(h.id, started.process, started.pid,
                                                  running=True))
    return Call(_exec_request(h, cmd, env, cwd, stdin, timeout, max_output, detach),
                convert, fold=ExecFolder, deadline=_own_deadline(timeout))


def processes(h) -> Call:
    """Its detached execs (running, and the last ended ones), oldest first."""
    return Call(pb.ListProcessesRequest(sandbox=h.id),
                lambda h, m: [r.process_from_pb(p) for p in m.processes])


def process(h, process_id: str) -> Call:
    """A handle on a detached exec (e.g. started before a client restart)."""
    return Call(pb.ProcessRequest(sandbox=h.id, process=process_id),
                lambda h, m: h._family.Process(h, r.process_from_pb(m)))


def open_session(h, kind: str = "bash", name: str = "", *, env: dict | None = None,
                 cwd: str = "") -> Call:
    """A persistent bash/sh/python session (its state lasts between runs)."""
    k = _enum_arg(SessionKind, kind, "session kind")
    req = pb.OpenSessionRequest(sandbox=h.id, name=name, env=env or {}, cwd=cwd,
                                kind=pb.SessionKind.Value(f"SESSION_KIND_{k.name}"))
    return Call(req, lambda h, m: h._family.Session(h, r.session_from_pb(m)))


def list_sessions(h) -> Call:
    return Call(pb.ListSessionsRequest(sandbox=h.id),
                lambda h, m: [r.session_from_pb(s) for s in m.sessions])


def session(h, name: str) -> Call:
    """A handle on an existing session (e.g. opened before a client restart)."""
    def convert(h, m):
        for s in m.sessions:
            if s.name == name:
                return h._family.Session(h, r.session_from_pb(s))
        raise SessionNotFound(f"no session {name!r}")
    return Call(pb.ListSessionsRequest(sandbox=h.id), convert)


def read_file(h, path: str, offset: int = 0, length: int = 0) -> Call:
    return Call(pb.ReadFileRequest(sandbox=h.id, path=path, offset=offset, length=length),
                lambda h, m: m.data)


def write_file(h, path: str, data: bytes | str, *, mode: int = 0, append: bool = False,
               make_parents: bool = False) -> Call:
    """Create or replace (or append to) a file; returns its size."""
    return Call(pb.WriteFileRequest(sandbox=h.id, path=path, data=_bytes(data, "data"),
                                    mode=mode, append=append, make_parents=make_parents),
                lambda h, m: m.size)


def list_dir(h, path: str = "/") -> Call:
    return Call(pb.ListDirRequest(sandbox=h.id, path=path),
                lambda h, m: [r.file_from_pb(e) for e in m.entries])


def stat(h, path: str) -> Call:
    """What is at `path` (a final symlink is not followed)."""
    return Call(pb.StatPathRequest(sandbox=h.id, path=path), lambda h, m: r.file_from_pb(m))


def remove(h, path: str, recursive: bool = False) -> Call:
    return Call(pb.RemovePathRequest(sandbox=h.id, path=path, recursive=recursive),
                lambda h, m: None)


def mkdir(h, path: str, parents: bool = False, mode: int = 0) -> Call:
    return Call(pb.MakeDirRequest(sandbox=h.id, path=path, parents=parents, mode=mode),
                lambda h, m: None)


def checkpoint(h, label: str = "", full: bool = False, wait_ready: bool = False,
               rollback_likely: bool | None = None, background: bool = False) -> Call:
    """An immutable checkpoint of the sandbox; it keeps running undisturbed. With
    `wait_ready`, returns once its body double (full) / standby (fs) is built: `.ready`
    then says whether a rollback to it takes the fast path. `rollback_likely` (full):
    True builds its body double, False none (a rollback to it restores); None lets the
    daemon's policy decide (adaptive: from the sandbox's rollback rate). `background`:
    returns once the cut is taken, while the daemon still records it (`.pending`; not
    durable until then: `wait_checkpoint`); its id is usable at once."""
    mode = CheckpointMode.FULL if full else CheckpointMode.FS
    req = pb.CheckpointRequest(sandbox=h.id, label=label, wait_ready=wait_ready,
                               background=background,
                               mode=pb.CheckpointMode.Value(f"CHECKPOINT_MODE_{mode.name}"))
    if rollback_likely is not None:
        req.rollback_likely = bool(rollback_likely)
    return Call(req, lambda h, m: r.checkpoint_from_pb(m),
                deadline=None if wait_ready else DEFAULT)


def rollback(h, checkpoint: str | r.CheckpointInfo) -> Call:
    """Back to a checkpoint of this sandbox's tree (same id, limits and network)."""
    def convert(h, m):
        res = r.rollback_from_pb(m)
        h.info = res.sandbox
        return res
    return Call(pb.RollbackRequest(sandbox=h.id, checkpoint=_checkpoint_id(checkpoint)),
                convert)


def checkpoints(h) -> Call:
    """This sandbox's checkpoint tree (with ancestors), oldest first."""
    return Call(pb.ListCheckpointsRequest(sandbox=h.id),
                lambda h, m: [r.checkpoint_from_pb(c) for c in m.checkpoints])


def diff_live(h, checkpoint: str | r.CheckpointInfo) -> Call:
    """What changed in the live sandbox since `checkpoint`."""
    return diff(h, checkpoint, h.id)


def sandbox_shell(h, argv: list[str] | None = None, *, env: dict | None = None,
                  rows: int = 24, cols: int = 80) -> Call:
    """An interactive terminal in this sandbox (see Client.shell)."""
    return shell(h, h.id, argv, env=env, rows=rows, cols=cols)


# ---- session ---------------------------------------------------------------------------------

def run(h, code: str, timeout: float = 0) -> Call:
    """Run code in the session and wait for it (only `timeout` limits it)."""
    return Call(pb.RunInSessionRequest(sandbox=h.sandbox.id, session=h.name, code=code,
                                       timeout_seconds=timeout),
                lambda h, m: r.session_result_from_pb(m), deadline=_own_deadline(timeout))


def close(h) -> Call:
    """Close (kill) the session."""
    return Call(pb.CloseSessionRequest(sandbox=h.sandbox.id, session=h.name),
                lambda h, m: None)


# ---- process ---------------------------------------------------------------------------------

def _process_info(h, m) -> r.ProcessInfo:
    h.info = r.process_from_pb(m)
    return h.info


def process_refresh(h) -> Call:
    return Call(pb.ProcessRequest(sandbox=h.sandbox.id, process=h.id), _process_info)


def logs_stream(h, follow: bool = False) -> Call:
    """stdout and stderr chunks (what is kept, then, with follow, live output), and `exit`
    once it has ended (ExecEvent)."""
    return Call(pb.ProcessLogsRequest(sandbox=h.sandbox.id, process=h.id, follow=follow),
                item=r.exec_event_from_pb, deadline=None if follow else DEFAULT)


def logs(h, follow: bool = False) -> Call:
    """Its kept output; with follow, everything until it ends."""
    return Call(pb.ProcessLogsRequest(sandbox=h.sandbox.id, process=h.id, follow=follow),
                lambda h, folded: folded.output(), fold=ExecFolder,
                deadline=None if follow else DEFAULT)


def signal(h, sig: int = 15) -> Call:
    """Signal its process group (default SIGTERM); FailedPrecondition once it ended."""
    return Call(pb.SignalProcessRequest(sandbox=h.sandbox.id, process=h.id, signal=int(sig)),
                _process_info)


def kill(h) -> Call:
    return signal(h, 9)


def wait(h, timeout: float = 0) -> Call:
    """Until it ends (DeadlineExceeded after `timeout` seconds; 0 = no limit)."""
    return Call(pb.WaitProcessRequest(sandbox=h.sandbox.id, process=h.id,
                                      timeout_seconds=timeout or 0),
                _process_info, deadline=_own_deadline(timeout))


# ---- the table ---------------------------------------------------------------------------------

def _op(owner, name, service, rpc, build, returns, **kw) -> Operation:
    return Operation(owner, name, service, rpc, build, returns, **kw)


S, C, I, Y = "sandboxes", "checkpoints", "images", "system"
OPERATIONS: tuple[Operation, ...] = (
    _op("client", "import_image", I, "ImportImage", import_image, "ImageInfo", shape="fold"),
    _op("client", "list_images", I, "ListImages", list_images, "list[ImageInfo]",
        idempotent=True),
    _op("client", "remove_image", I, "RemoveImage", remove_image, "None"),
    _op("client", "create", S, "CreateSandbox", create, "Sandbox", closable=True),
    _op("client", "get", S, "GetSandbox", get, "Sandbox", idempotent=True),
    _op("client", "list", S, "ListSandboxes", list_sandboxes, "list[Sandbox]",
        idempotent=True),
    _op("client", "status", Y, "Status", status, "Status", idempotent=True),
    _op("client", "stats", Y, "Stats", stats, "Stats", idempotent=True),
    _op("client", "fork", C, "Fork", fork, "ForkResult"),
    _op("client", "warm", C, "Warm", warm, "int"),
    _op("client", "diff", C, "Diff", diff, "list[DiffEntry]", idempotent=True),
    _op("client", "wait_checkpoint", C, "WaitCheckpoint", wait_checkpoint, "CheckpointInfo",
        idempotent=True),
    _op("client", "delete_checkpoint", C, "DeleteCheckpoint", delete_checkpoint, "None"),
    _op("client", "pin_checkpoint", C, "PinCheckpoint", pin_checkpoint, "CheckpointInfo",
        idempotent=True),
    _op("client", "shell", S, "Shell", shell, "Shell", shape="shell"),
    _op("client", "checkpoint_many", C, "CheckpointMany", checkpoint_many, "BatchResult"),
    _op("client", "rollback_many", C, "RollbackMany", rollback_many, "BatchResult"),
    _op("client", "exec_many", S, "ExecMany", exec_many, "BatchResult"),

    _op("sandbox", "refresh", S, "GetSandbox", refresh, "Sandbox", idempotent=True),
    _op("sandbox", "destroy", S, "DestroySandbox", destroy, "None"),
    _op("sandbox", "exec_stream", S, "Exec", exec_stream, "Iterator[ExecEvent]", shape="iter"),
    _op("sandbox", "exec", S, "Exec", exec_, "ExecResult | Process", shape="fold"),
    _op("sandbox", "processes", S, "ListProcesses", processes, "list[ProcessInfo]",
        idempotent=True),
    _op("sandbox", "process", S, "GetProcess", process, "Process", idempotent=True),
    _op("sandbox", "open_session", S, "OpenSession", open_session, "Session", closable=True),
    _op("sandbox", "list_sessions", S, "ListSessions", list_sessions, "list[SessionInfo]",
        idempotent=True),
    _op("sandbox", "session", S, "ListSessions", session, "Session", idempotent=True),
    _op("sandbox", "read_file", S, "ReadFile", read_file, "bytes", idempotent=True),
    _op("sandbox", "write_file", S, "WriteFile", write_file, "int"),
    _op("sandbox", "list_dir", S, "ListDir", list_dir, "list[FileInfo]", idempotent=True),
    _op("sandbox", "stat", S, "StatPath", stat, "FileInfo", idempotent=True),
    _op("sandbox", "remove", S, "RemovePath", remove, "None"),
    _op("sandbox", "mkdir", S, "MakeDir", mkdir, "None"),
    _op("sandbox", "checkpoint", C, "Checkpoint", checkpoint, "CheckpointInfo"),
    _op("sandbox", "rollback", C, "Rollback", rollback, "RollbackResult"),
    _op("sandbox", "checkpoints", C, "ListCheckpoints", checkpoints, "list[CheckpointInfo]",
        idempotent=True),
    _op("sandbox", "diff", C, "Diff", diff_live, "list[DiffEntry]", idempotent=True),
    _op("sandbox", "shell", S, "Shell", sandbox_shell, "Shell", shape="shell"),

    _op("session", "run", S, "RunInSession", run, "SessionResult"),
    _op("session", "close", S, "CloseSession", close, "None"),

    _op("process", "refresh", S, "GetProcess", process_refresh, "ProcessInfo",
        idempotent=True),
    _op("process", "logs_stream", S, "ProcessLogs", logs_stream, "Iterator[ExecEvent]",
        shape="iter"),
    _op("process", "logs", S, "ProcessLogs", logs, "ProcessOutput", shape="fold",
        idempotent=True),
    _op("process", "signal", S, "SignalProcess", signal, "ProcessInfo"),
    _op("process", "kill", S, "SignalProcess", kill, "ProcessInfo"),
    _op("process", "wait", S, "WaitProcess", wait, "ProcessInfo", idempotent=True),
)


# Moving checkpoints between daemons (deltabox.client.transfer builds on Call and Folder above;
# the package imports this module first).
from deltabox.client.transfer import TRANSFER_OPERATIONS  # noqa: E402

OPERATIONS = OPERATIONS + TRANSFER_OPERATIONS


def operations_of(owner: str) -> list[Operation]:
    return [op for op in OPERATIONS if op.owner == owner]
