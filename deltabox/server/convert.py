"""Protobuf <-> domain conversions, shared by the daemon's servicers and the client."""

from __future__ import annotations

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.core.images import ImageRecord
from deltabox.store.metadata import SandboxRecord

__all__ = ["sandbox_pb", "image_pb", "STATE_PB", "NETWORK_PB", "NETWORK_FROM_PB",
           "SESSION_KIND_FROM_PB", "SESSION_KIND_PB", "FILE_TYPE_PB"]

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
