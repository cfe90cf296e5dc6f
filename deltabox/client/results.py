"""What the client's calls return: plain dataclasses, never protobuf messages.

Each result mirrors one message of `proto/deltabox/v1/deltabox.proto` field for field (same
names, so `sbx.info.init_pid` or `ckpt.timings_ms` read as the proto documents them), with
the wire's enum integers turned into the vocabularies of `deltabox.types`
(`SandboxInfo.state` is a `SandboxState`, equal to the string "running"), repeated fields
into lists and maps into dicts. The `from_pb` functions at the bottom are the only place
that reads a reply message; the operation table (`operations.py`) names one per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.errors import DeltaboxError, error_for_code
from deltabox.types import (CheckpointMode, DiffChange, FileType, NetworkMode, RollbackPath,
                            SandboxState, SessionKind)

__all__ = ["Limits", "SandboxInfo", "ImageInfo", "ImportProgress", "ExecStarted", "ExecExit",
           "ExecEvent", "ExecResult", "ProcessInfo", "ProcessOutput", "SessionInfo",
           "SessionResult", "FileInfo", "CheckpointInfo", "RollbackResult", "ForkChild",
           "ForkResult", "DiffEntry", "Status", "OperationStats", "Stats", "ShellExit",
           "BatchItem", "BatchResult", "ManifestLayer", "Manifest", "ExportResult"]


# ---- sandboxes and images -------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 0
    pids: int = 0
    cpus: float = 0.0
    disk_bytes: int = 0
    disk_inodes: int = 0


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the daemon last described it (`Sandbox.refresh()` asks again)."""
    id: str
    name: str = ""
    image: str = ""
    state: SandboxState | None = None
    limits: Limits = field(default_factory=Limits)
    network: NetworkMode = NetworkMode.NONE
    created_at: float = 0.0
    init_pid: int = 0          # host pid of its init (0 when not running)
    branch_id: str = ""
    env: dict[str, str] = field(default_factory=dict)
    hostname: str = ""
    ip_address: str = ""       # NAT mode only


@dataclass(frozen=True)
class ImageInfo:
    name: str
    layer_ids: list[str] = field(default_factory=list)  # bottom first
    size_bytes: int = 0
    created_at: float = 0.0
    source: str = ""
    source_format: str = ""    # tar | dir | docker-archive | oci


@dataclass(frozen=True)
class ImportProgress:
    """One step of an import; the last one carries the imported `image`."""
    phase: str
    done_bytes: int = 0
    total_bytes: int = 0
    image: ImageInfo | None = None


# ---- exec, detached processes, sessions -------------------------------------------------------

@dataclass(frozen=True)
class ExecStarted:
    pid: int                   # inside the sandbox
    process: str = ""          # detach only: the process's id


@dataclass(frozen=True)
class ExecExit:
    exit_code: int             # -1 if killed by a signal
    signal: int = 0
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_seconds: float = 0.0


@dataclass(frozen=True)
class ExecEvent:
    """One event of an exec (or a process's logs): `kind` says which field is set."""
    kind: str                  # "started" | "stdout" | "stderr" | "exit"
    stdout: bytes = b""
    stderr: bytes = b""
    started: ExecStarted | None = None
    exit: ExecExit | None = None


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
        """Raise DeltaboxError unless the command succeeded."""
        if self.exit_code != 0:
            raise DeltaboxError(f"command failed with exit code {self.exit_code} "
                                f"(signal {self.signal}): {self.stderr[-2000:]!r}")
        return self


@dataclass(frozen=True)
class ProcessInfo:
    """A detached exec's record, as the sandbox's init keeps it."""
    sandbox_id: str
    id: str
    pid: int = 0
    command: str = ""
    running: bool = False
    exit_code: int = 0         # once ended: -1 if killed by a signal
    signal: int = 0
    stdout_bytes: int = 0
    stderr_bytes: int = 0


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


@dataclass(frozen=True)
class SessionInfo:
    sandbox_id: str
    name: str
    kind: SessionKind = SessionKind.BASH
    pid: int = 0


@dataclass
class SessionResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float


@dataclass(frozen=True)
class ShellExit:
    """How an interactive shell ended (`Shell.exit`)."""
    exit_code: int
    signal: int = 0

    @property
    def status(self) -> int:
        """A shell's view: the exit code, or 128 + the signal."""
        return self.exit_code if self.signal == 0 else 128 + self.signal


# ---- files ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileInfo:
    path: str
    name: str
    type: FileType
    size: int = 0
    mode: int = 0              # permission bits
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    link_target: str = ""      # symlinks only


# ---- checkpoints ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointInfo:
    id: str
    sandbox_id: str = ""
    parent_id: str = ""
    label: str = ""
    mode: CheckpointMode = CheckpointMode.FS
    created_at: float = 0.0
    layer_ids: list[str] = field(default_factory=list)
    pinned: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    image_bytes: int = 0
    layer_bytes: int = 0
    image_shared_bytes: int = 0
    restorable: bool = True
    unusable_reason: str = ""
    ready: bool = False        # a body double / standby waits: rollback takes the fast path
    unchanged: bool = False    # Checkpoint: nothing happened since the head, returned again
    pending: bool = False      # Checkpoint(background=True): still being recorded, not durable


@dataclass
class RollbackResult:
    sandbox: SandboxInfo
    # DOUBLE / STANDBY: a ready incarnation was swapped in; *_WAITED: it was still being
    # built and the rollback waited for it; RESTORE (CRIU) / FRESH (a new init): none was.
    path: RollbackPath
    timings_ms: dict[str, float]


@dataclass
class ForkChild:
    """One child of a fork: `sandbox` (a handle) on success, else `error`."""
    sandbox: Any = None
    error: DeltaboxError | None = None


class ForkResult(list):
    """The children of a fork (a list of ForkChild), plus the daemon's timings."""

    def __init__(self, children=(), timings_ms: dict | None = None):
        super().__init__(children)
        self.timings_ms = dict(timings_ms or {})


@dataclass
class BatchItem:
    """One item of a batched call (`checkpoint_many`, `rollback_many`, `exec_many`): its
    single call's result in `value` (CheckpointInfo, RollbackResult, ExecResult), or the
    exception that call would have raised in `error`."""
    value: Any = None
    error: DeltaboxError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self):
        """`value`, or raise `error`."""
        if self.error is not None:
            raise self.error
        return self.value


class BatchResult(list):
    """The items of a batched call (a list of BatchItem, in the request's order), plus the
    daemon's timings."""

    def __init__(self, items=(), timings_ms: dict | None = None):
        super().__init__(items)
        self.timings_ms = dict(timings_ms or {})

    def values(self) -> list:
        """Every item's value; raises the first item's error if any failed."""
        return [item.unwrap() for item in self]


class DiffEntry(NamedTuple):
    """(path, change): still compares equal to a plain ("path", "added") tuple."""
    path: str
    change: DiffChange


# ---- the daemon -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    version: str
    state_dir: str = ""
    store_backing: str = ""
    store_size_bytes: int = 0
    store_free_bytes: int = 0
    sandboxes: int = 0
    images: int = 0
    criu_version: str = ""
    uptime_seconds: float = 0.0
    disk_quotas: str = ""
    store_inodes: int = 0
    store_free_inodes: int = 0
    store_reserve_bytes: int = 0
    store_reserve_inodes: int = 0
    store_below_reserve: bool = False


@dataclass(frozen=True)
class OperationStats:
    operation: str
    count: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0


@dataclass(frozen=True)
class Stats:
    operations: list[OperationStats]
    prometheus_text: str = ""


# ---- moving checkpoints ------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestLayer:
    digest: str           # "sha256:<hex>": the layer's content address
    size_bytes: int = 0   # uncompressed transfer bytes


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint is made of, as another daemon needs it (CheckpointManifest)."""
    checkpoint_id: str
    mode: CheckpointMode
    label: str = ""
    parent_id: str = ""
    sandbox_id: str = ""
    created_at: float = 0.0
    image: str = ""
    image_layers: int = 0             # how many of `layers` are the image's
    layers: list[ManifestLayer] = field(default_factory=list)  # bottom first
    kernel_release: str = ""
    criu_version: str = ""
    arch: str = ""
    store_format: str = ""
    format: str = ""
    images_bytes: int = 0             # FULL: bytes of CRIU images

    @property
    def digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the stream's bytes (compressed, framed) and its layers."""
    checkpoint_id: str
    bytes_sent: int = 0
    chunks: int = 0
    layers_sent: int = 0
    layers_skipped: int = 0


# ---- from the wire ----------------------------------------------------------------------------

def _enum(vocabulary, pb_enum, prefix: str, value: int, default=None):
    """The vocabulary's member for a wire enum value (SANDBOX_STATE_RUNNING -> RUNNING);
    `default` for UNSPECIFIED and for values this client does not know (a newer daemon)."""
    try:
        name = pb_enum.Name(value).removeprefix(prefix)
        return vocabulary[name]
    except (KeyError, ValueError):
        return default


def _fields(msg, cls, **converted) -> dict:
    """Keyword arguments for `cls` from the same-named fields of `msg`, except `converted`."""
    out = {}
    for f in cls.__dataclass_fields__:
        out[f] = converted[f] if f in converted else getattr(msg, f)
    return out


def limits_from_pb(m: pb.Limits) -> Limits:
    return Limits(**_fields(m, Limits))


def sandbox_from_pb(m: pb.Sandbox) -> SandboxInfo:
    return SandboxInfo(**_fields(
        m, SandboxInfo, limits=limits_from_pb(m.limits), env=dict(m.env),
        state=_enum(SandboxState, pb.SandboxState, "SANDBOX_STATE_", m.state),
        network=_enum(NetworkMode, pb.NetworkMode, "NETWORK_MODE_", m.network,
                      NetworkMode.NONE)))


def image_from_pb(m: pb.Image) -> ImageInfo:
    return ImageInfo(**_fields(m, ImageInfo, layer_ids=list(m.layer_ids)))


def import_progress_from_pb(m: pb.ImportImageProgress) -> ImportProgress:
    return ImportProgress(m.phase, m.done_bytes, m.total_bytes,
                          image_from_pb(m.image) if m.HasField("image") else None)


def exec_exit_from_pb(m: pb.ExecExit) -> ExecExit:
    return ExecExit(**_fields(m, ExecExit))


def exec_event_from_pb(m: pb.ExecEvent) -> ExecEvent:
    kind = m.WhichOneof("event")
    if kind == "started":
        return ExecEvent(kind, started=ExecStarted(m.started.pid, m.started.process))
    if kind == "exit":
        return ExecEvent(kind, exit=exec_exit_from_pb(m.exit))
    if kind == "stdout":
        return ExecEvent(kind, stdout=m.stdout)
    if kind == "stderr":
        return ExecEvent(kind, stderr=m.stderr)
    raise DeltaboxError(f"an exec event of an unknown kind ({kind})")


def process_from_pb(m: pb.Process) -> ProcessInfo:
    return ProcessInfo(**_fields(m, ProcessInfo))


def session_from_pb(m: pb.Session) -> SessionInfo:
    return SessionInfo(m.sandbox_id, m.name, _enum(SessionKind, pb.SessionKind, "SESSION_KIND_",
                                                   m.kind, SessionKind.BASH), m.pid)


def session_result_from_pb(m: pb.RunInSessionResponse) -> SessionResult:
    return SessionResult(m.exit_code, m.stdout, m.stderr, m.duration_seconds)


def file_from_pb(m: pb.FileInfo) -> FileInfo:
    return FileInfo(**_fields(m, FileInfo, type=_enum(FileType, pb.FileType, "FILE_TYPE_",
                                                      m.type, FileType.OTHER)))


def checkpoint_from_pb(m: pb.CheckpointInfo) -> CheckpointInfo:
    return CheckpointInfo(**_fields(
        m, CheckpointInfo, layer_ids=list(m.layer_ids), timings_ms=dict(m.timings_ms),
        mode=_enum(CheckpointMode, pb.CheckpointMode, "CHECKPOINT_MODE_", m.mode,
                   CheckpointMode.FS)))


def rollback_from_pb(m: pb.RollbackResponse) -> RollbackResult:
    try:
        path = RollbackPath(m.path)
    except ValueError:  # a newer daemon's path: keep its word
        path = m.path
    return RollbackResult(sandbox_from_pb(m.sandbox), path, dict(m.timings_ms))


def exec_output_from_pb(m: pb.ExecOutput) -> ExecResult:
    x = m.exit
    return ExecResult(x.exit_code, m.stdout, m.stderr, x.signal, x.timed_out,
                      x.stdout_truncated, x.stderr_truncated, x.duration_seconds, m.pid)


def batch_from_pb(m, value_field: str, convert) -> BatchResult:
    """A *ManyResponse: each result's `value_field` through `convert`, or its error as the
    exception the single call would have raised."""
    items = []
    for res in m.results:
        if res.WhichOneof("outcome") == "error":
            e = res.error
            items.append(BatchItem(error=error_for_code(e.code, e.message, e.domain)))
        else:
            items.append(BatchItem(value=convert(getattr(res, value_field))))
    return BatchResult(items, dict(m.timings_ms))


def diff_from_pb(m: pb.DiffResponse) -> list[DiffEntry]:
    out = []
    for e in m.entries:
        try:
            change = DiffChange(e.change)
        except ValueError:
            change = e.change
        out.append(DiffEntry(e.path, change))
    return out


def status_from_pb(m: pb.StatusResponse) -> Status:
    return Status(**_fields(m, Status))


def stats_from_pb(m: pb.StatsResponse) -> Stats:
    return Stats([OperationStats(**_fields(o, OperationStats)) for o in m.operations],
                 m.prometheus_text)


def manifest_from_pb(m: pb.Manifest) -> Manifest:
    return Manifest(**_fields(
        m, Manifest, layers=[ManifestLayer(x.digest, x.size_bytes) for x in m.layers],
        mode=_enum(CheckpointMode, pb.CheckpointMode, "CHECKPOINT_MODE_", m.mode,
                   CheckpointMode.FS)))
