"""Every protobuf <-> domain conversion of the daemon, in one place.

Requests come in as protobuf messages and leave the servicers as domain values (strings of
`deltabox.types`, records of `deltabox.store.records`); domain results become protobuf
replies here. The servicers (`deltabox.server.servicers`) only call these and the domain
layer. The client has its own conversions (protobuf -> its dataclasses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb

if TYPE_CHECKING:
    from deltabox.core.sandboxes import ExecEvent, ProcessInfo
    from deltabox.store.records import ImageRecord, SandboxRecord

__all__ = ["sandbox_pb", "image_pb", "exec_event_pb", "exit_pb", "process_pb", "file_info_pb",
           "checkpoint_pb", "diff_entry_pb", "session_pb", "session_result_pb", "rollback_pb",
           "printable_path", "STATE_PB", "NETWORK_PB", "NETWORK_FROM_PB", "MODE_PB",
           "MODE_FROM_PB", "SESSION_KIND_FROM_PB", "SESSION_KIND_PB", "FILE_TYPE_PB"]

STATE_PB = {"creating": pb.SANDBOX_STATE_CREATING, "running": pb.SANDBOX_STATE_RUNNING,
            "stopped": pb.SANDBOX_STATE_STOPPED, "broken": pb.SANDBOX_STATE_BROKEN}
NETWORK_PB = {"none": pb.NETWORK_MODE_NONE, "nat": pb.NETWORK_MODE_NAT}
NETWORK_FROM_PB = {pb.NETWORK_MODE_UNSPECIFIED: "none", pb.NETWORK_MODE_NONE: "none",
                   pb.NETWORK_MODE_NAT: "nat"}
SESSION_KIND_FROM_PB = {pb.SESSION_KIND_UNSPECIFIED: "bash", pb.SESSION_KIND_BASH: "bash",
                        pb.SESSION_KIND_SH: "sh", pb.SESSION_KIND_PYTHON: "python"}
SESSION_KIND_PB = {"bash": pb.SESSION_KIND_BASH, "sh": pb.SESSION_KIND_SH,
                   "python": pb.SESSION_KIND_PYTHON}
FILE_TYPE_PB = {"regular": pb.FILE_TYPE_REGULAR, "directory": pb.FILE_TYPE_DIRECTORY,
                "symlink": pb.FILE_TYPE_SYMLINK, "other": pb.FILE_TYPE_OTHER}
MODE_PB = {"fs": pb.CHECKPOINT_MODE_FS, "full": pb.CHECKPOINT_MODE_FULL}
MODE_FROM_PB = {pb.CHECKPOINT_MODE_UNSPECIFIED: "fs", pb.CHECKPOINT_MODE_FS: "fs",
                pb.CHECKPOINT_MODE_FULL: "full"}


def sandbox_pb(rec: SandboxRecord, ip_address: str = "") -> pb.Sandbox:
    spec = rec.spec
    return pb.Sandbox(
        id=rec.id, name=rec.name, image=rec.image, state=STATE_PB.get(rec.state, 0),
        limits=pb.Limits(memory_bytes=spec.get("memory_bytes", 0), pids=spec.get("pids", 0),
                         cpus=spec.get("cpus", 0.0), disk_bytes=spec.get("disk_bytes", 0),
                         disk_inodes=spec.get("disk_inodes", 0)),
        network=NETWORK_PB.get(spec.get("network", "none"), 0), created_at=rec.created_at,
        init_pid=rec.init_pid if rec.state == "running" else 0, branch_id=rec.branch_id,
        env=spec.get("env", {}), hostname=spec.get("hostname", ""),
        ip_address=ip_address or spec.get("ip_address", ""))


def image_pb(rec: ImageRecord) -> pb.Image:
    return pb.Image(name=rec.name, layer_ids=list(rec.layer_ids), size_bytes=rec.size_bytes,
                    created_at=rec.created_at, source=rec.source,
                    source_format=rec.source_format)


# ---- processes ---------------------------------------------------------------------------

def exec_event_pb(ev: ExecEvent) -> pb.ExecEvent:
    if ev.kind == "started":
        return pb.ExecEvent(started=pb.ExecStarted(pid=ev.pid))
    if ev.kind == "stdout":
        return pb.ExecEvent(stdout=ev.data)
    if ev.kind == "stderr":
        return pb.ExecEvent(stderr=ev.data)
    return pb.ExecEvent(exit=exit_pb(ev))


def exit_pb(ev: ExecEvent) -> pb.ExecExit:
    return pb.ExecExit(exit_code=ev.exit_code, signal=ev.signal, timed_out=ev.timed_out,
                       stdout_truncated=ev.stdout_truncated,
                       stderr_truncated=ev.stderr_truncated, duration_seconds=ev.duration)


def process_pb(sandbox_id: str, p: ProcessInfo) -> pb.Process:
    return pb.Process(sandbox_id=sandbox_id, id=p.id, pid=p.pid, command=p.command,
                      running=p.running, exit_code=p.exit_code, signal=p.signal,
                      stdout_bytes=p.stdout_bytes, stderr_bytes=p.stderr_bytes)


def session_pb(sandbox_id: str, name: str, kind: str, pid: int) -> pb.Session:
    return pb.Session(sandbox_id=sandbox_id, name=name, kind=SESSION_KIND_PB.get(kind, 0),
                      pid=pid)


def session_result_pb(res) -> pb.RunInSessionResponse:
    return pb.RunInSessionResponse(stdout=res.stdout, stderr=res.stderr,
                                   exit_code=res.exit_code, duration_seconds=res.duration)


# ---- files -------------------------------------------------------------------------------

def printable_path(path: str) -> str:
    """A file name for a protobuf string: bytes that are not UTF-8 (surrogate-escaped
    by Python) become backslash escapes (\\xff)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def file_info_pb(info) -> pb.FileInfo:
    return pb.FileInfo(path=printable_path(info.path), name=printable_path(info.name),
                       type=FILE_TYPE_PB[info.type],
                       size=info.size, mode=info.mode, uid=info.uid, gid=info.gid,
                       mtime=info.mtime, link_target=printable_path(info.link_target))


# ---- checkpoints ---------------------------------------------------------------------------

def checkpoint_pb(c, ready: bool = False, pending: bool = False) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        ready=ready, pending=pending, id=c.id, sandbox_id=c.sandbox_id, parent_id=c.parent_id, label=c.label,
        mode=MODE_PB.get(c.mode, 0), created_at=c.created_at, layer_ids=list(c.mount_layers),
        pinned=c.pinned, timings_ms={k: float(v) for k, v in c.stats.items()
                                     if k.endswith("_ms")},
        image_bytes=int(c.stats.get("image_bytes", 0)),
        image_shared_bytes=int(c.stats.get("shared_bytes", 0)),
        layer_bytes=int(c.stats.get("cloned_bytes", 0)),
        restorable=c.restorable, unusable_reason=c.unusable_reason,
        unchanged=bool(c.stats.get("unchanged")))


def rollback_pb(rec: SandboxRecord, path: str, timings: dict) -> pb.RollbackResponse:
    return pb.RollbackResponse(sandbox=sandbox_pb(rec), path=path, timings_ms=timings)


def diff_entry_pb(path: str, change: str) -> pb.DiffEntry:
    """One entry of a diff; `path` is relative to the sandbox's root."""
    return pb.DiffEntry(path=printable_path("/" + path), change=change)
