"""Moving checkpoints between daemons, client side: the operations `checkpoint_manifest`,
`have_layers`, `export_checkpoint`, `import_checkpoint` (part of the operation table), the
file format of an exported checkpoint, and `send_checkpoint` (one daemon's export piped
straight into another's import: two clients, so it is a method of its own per family).

    with Client(socket=a) as src, Client(socket=b) as dst:
        src.export_checkpoint(ckpt, "ck.dbx")        # a file ...
        dst.import_checkpoint("ck.dbx")              # ... that any daemon imports
        dst_ckpt = src.send_checkpoint(ckpt, to=dst)  # or no file at all
        dst.fork(dst_ckpt, 4)

A file is `MAGIC` followed by the stream's `ExportChunk` messages, each prefixed by its
length (4 bytes, big-endian). Its checksums are the stream's own (deltabox.core.transfer).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Iterable, Iterator

import grpc
from google.protobuf.message import DecodeError

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.client import results as r
from deltabox.client.connection import DEFAULT, error_from_rpc
from deltabox.client.operations import Call, Folder, Operation
from deltabox.client.results import CheckpointInfo
from deltabox.errors import InvalidArgument

__all__ = ["MAGIC", "TRANSFER_OPERATIONS", "write_chunk", "read_chunks", "send_checkpoint",
           "send_checkpoint_async"]

MAGIC = b"DELTABOX-CHECKPOINT\n1\n"
MAX_CHUNK = 64 << 20   # a frame larger than this is not one of ours


def _checkpoint_id(checkpoint) -> str:
    return checkpoint.id if isinstance(checkpoint, r.CheckpointInfo) else checkpoint


def write_chunk(f: BinaryIO, chunk: pb.ExportChunk) -> int:
    data = chunk.SerializeToString()
    f.write(len(data).to_bytes(4, "big"))
    f.write(data)
    return 4 + len(data)


def read_chunks(pieces: Iterable[bytes]) -> Iterator[pb.ExportChunk]:
    """The chunks of an exported file, from its bytes in pieces of any size. A file cut
    short simply ends: the daemon reports the stream as truncated."""
    buf = bytearray()
    it = iter(pieces)
    magic_seen = False
    for piece in it:
        buf += piece
        if not magic_seen:
            if len(buf) < len(MAGIC):
                continue
            if bytes(buf[:len(MAGIC)]) != MAGIC:
                raise InvalidArgument("not an exported DeltaBox checkpoint (bad magic)")
            del buf[:len(MAGIC)]
            magic_seen = True
        while len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if n > MAX_CHUNK:
                raise InvalidArgument(f"exported checkpoint corrupt: a {n}-byte frame")
            if len(buf) < 4 + n:
                break
            chunk = pb.ExportChunk()
            try:
                chunk.ParseFromString(bytes(buf[4:4 + n]))
            except DecodeError:
                raise InvalidArgument("exported checkpoint corrupt: a frame does not "
                                      "parse") from None
            del buf[:4 + n]
            yield chunk
    if not magic_seen and buf:
        raise InvalidArgument("not an exported DeltaBox checkpoint (bad magic)")


def _pieces(src) -> Iterator[bytes]:
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")
    elif isinstance(src, (io.IOBase,)) or hasattr(src, "read"):
        yield from iter(lambda: src.read(1 << 20), b"")
    else:
        for piece in src:
            if not isinstance(piece, (bytes, bytearray, memoryview)):
                raise TypeError(f"src must yield bytes, not {type(piece).__name__}")
            yield bytes(piece)


class ExportFolder(Folder):
    """Writes an export's chunks to a path (via `<path>.part`, renamed at the end) or a
    binary file object."""

    def __init__(self, checkpoint_id: str, out):
        self.checkpoint_id, self.out = checkpoint_id, out
        self.f = None
        self.bytes = self.chunks = 0
        self.trailer = None

    def add(self, item: pb.ExportChunk) -> None:
        if self.f is None:
            if isinstance(self.out, (str, os.PathLike)):
                self.f = open(f"{os.fspath(self.out)}.part", "wb")
            else:
                self.f = self.out
            self.f.write(MAGIC)
            self.bytes += len(MAGIC)
        self.bytes += write_chunk(self.f, item)
        self.chunks += 1
        if item.WhichOneof("part") == "trailer":
            self.trailer = item.trailer

    def result(self) -> r.ExportResult:
        if isinstance(self.out, (str, os.PathLike)) and self.f is not None:
            self.f.close()
            os.replace(f"{os.fspath(self.out)}.part", self.out)
        elif self.f is not None:
            self.f.flush()
        t = self.trailer
        return r.ExportResult(self.checkpoint_id, self.bytes, self.chunks,
                              t.layers_sent if t else 0, t.layers_skipped if t else 0)


# ---- the operations -----------------------------------------------------------------------------

def checkpoint_manifest(h, checkpoint: str | r.CheckpointInfo) -> Call:
    """What a checkpoint is made of, as another daemon needs it: its layers' content
    digests, its image, and the host facts an import checks."""
    return Call(pb.CheckpointManifestRequest(checkpoint=_checkpoint_id(checkpoint)),
                lambda h, m: r.manifest_from_pb(m), deadline=None)


def have_layers(h, digests: list[str]) -> Call:
    """Which of these layer digests the daemon holds."""
    if isinstance(digests, str):
        raise TypeError("digests must be a list of digests, not a str")
    return Call(pb.HaveLayersRequest(digests=list(digests)), lambda h, m: list(m.have))


def export_checkpoint(h, checkpoint: str | r.CheckpointInfo, out: str | os.PathLike | BinaryIO,
                      *, skip_layers: Iterable[str] = ()) -> Call:
    """Write a checkpoint to `out` (a path, written whole or not at all, or a binary file
    object) as a stream any daemon of the same kernel and CRIU can import; layers whose
    digest is in `skip_layers` are left out (the receiver holds them)."""
    if not isinstance(out, (str, os.PathLike)) and not hasattr(out, "write"):
        raise TypeError(f"out must be a path or a binary file, not {type(out).__name__}")
    cid = _checkpoint_id(checkpoint)
    return Call(pb.ExportCheckpointRequest(checkpoint=cid, skip_layers=list(skip_layers)),
                fold=lambda: ExportFolder(cid, out), deadline=None)


def import_checkpoint(h, src: str | os.PathLike | BinaryIO | Iterable[bytes]) -> Call:
    """Import an exported checkpoint (a path, a binary file, or its bytes in pieces): it
    keeps its id, and `fork` works on it here. Importing one the daemon has is a no-op."""
    if isinstance(src, (bytes, bytearray)):
        src = [bytes(src)]
    return Call(read_chunks(_pieces(src)), lambda h, m: r.checkpoint_from_pb(m), deadline=None)


TRANSFER_OPERATIONS = (
    Operation("client", "checkpoint_manifest", "checkpoints", "CheckpointManifest",
              checkpoint_manifest, "Manifest", idempotent=True),
    Operation("client", "have_layers", "checkpoints", "HaveLayers", have_layers, "list[str]",
              idempotent=True),
    Operation("client", "export_checkpoint", "checkpoints", "ExportCheckpoint",
              export_checkpoint, "ExportResult", shape="fold"),
    Operation("client", "import_checkpoint", "checkpoints", "ImportCheckpoint",
              import_checkpoint, "CheckpointInfo"),
)


# ---- send: one daemon's export into another's import ----------------------------------------

def send_checkpoint(self, checkpoint: str | r.CheckpointInfo, to,
                    *, deadline=DEFAULT) -> CheckpointInfo:
    """Copy a checkpoint to the daemon of `to` (another Client), sending only the layers
    it does not hold, streamed from this daemon's export into its import (no file).
    Returns the checkpoint as the target knows it (same id)."""
    man = self.checkpoint_manifest(checkpoint, deadline=deadline)
    have = to.have_layers(man.digests, deadline=deadline)
    timeout = None if deadline is DEFAULT else deadline
    stream = self._stubs["checkpoints"].ExportCheckpoint(
        pb.ExportCheckpointRequest(checkpoint=man.checkpoint_id, skip_layers=have),
        timeout=timeout)
    failed: list[grpc.RpcError] = []

    def pipe():
        try:
            yield from stream
        except grpc.RpcError as e:  # the import then sees a truncated stream
            failed.append(e)

    try:
        reply = to._stubs["checkpoints"].ImportCheckpoint(pipe(), timeout=timeout)
    except grpc.RpcError as e:
        raise error_from_rpc(failed[0] if failed else e) from None
    finally:
        stream.cancel()
    return r.checkpoint_from_pb(reply)


async def send_checkpoint_async(self, checkpoint: str | r.CheckpointInfo, to,
                                *, deadline=DEFAULT) -> CheckpointInfo:
    """As Client.send_checkpoint; `to` is another AsyncClient."""
    man = await self.checkpoint_manifest(checkpoint, deadline=deadline)
    have = await to.have_layers(man.digests, deadline=deadline)
    timeout = None if deadline is DEFAULT else deadline
    stream = self._stubs["checkpoints"].ExportCheckpoint(
        pb.ExportCheckpointRequest(checkpoint=man.checkpoint_id, skip_layers=have),
        timeout=timeout)
    failed: list[grpc.RpcError] = []

    async def pipe():
        try:
            async for chunk in stream:
                yield chunk
        except grpc.RpcError as e:
            failed.append(e)

    try:
        reply = await to._stubs["checkpoints"].ImportCheckpoint(pipe(), timeout=timeout)
    except grpc.RpcError as e:
        raise error_from_rpc(failed[0] if failed else e) from None
    finally:
        stream.cancel()
    return r.checkpoint_from_pb(reply)

send_checkpoint_async.__name__ = "send_checkpoint"
