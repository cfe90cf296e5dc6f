"""The checkpoint transfer stream: its frames, checksums and compression, and the records a
layer (or a directory of CRIU images) becomes -- written from a tree, read back into one.

A stream is a sequence of the API's `ExportChunk` messages, so a file (`deltabox export`)
and the RPCs carry the same bytes::

    manifest                       what the checkpoint is, and the host facts it needs
    start(layer, digest)  block*  end(sha256)    one per layer not skipped, bottom first
    start(images)         block*  end(sha256)    FULL checkpoints: the CRIU images
    trailer                        counts, signature; nothing may follow it

Checksums: every chunk carries `running_sha256`, the sha256 of every chunk's part so far
(this one included), so a flipped bit, a dropped, repeated or reordered chunk, or an edited
manifest is caught at the chunk it happens in; a stream that ends before its trailer is
truncated. The trailer's `hmac_sha256` signs the running sha256 before it with the
exporting daemon's transfer key, if it has one (`deltabox.core.transfer_key`). Each
section's `end` carries the sha256 of its uncompressed records: for a layer that is its
content digest, the address `HaveLayers` matches.

Compression: a section's records are cut in blocks of 1 MiB, each sent as its own chunk,
deflated by zlib (stdlib) at level 1 (`data`) -- or as is (`stored`) when deflating a
64 KiB sample of it does not save a tenth: CRIU's pages of random or already compressed
memory do not shrink, and deflating them costs more time than the bytes it saves.
Independent blocks also bound what one chunk inflates to (1 MiB). Why zlib 1, measured
with `deltabox bench transfer` (docs/scale-out.md, "Moving checkpoints"): level 6 costs
about 1.4x its CPU for the same ratio on page images; zstd would be faster but is a
compiled dependency both ends (the client included) would need; zlib is everywhere.

Records (uncompressed), one per entry, sorted by path (parents first, so a digest does not
depend on the order a directory lists in)::

    header  >cIIIqQHHI: kind, mode, uid, gid, mtime_ns, size, len(name), len(link),
            len(xattrs)      then name, link, xattrs (>HI key value ...), size data bytes

kinds: d directory, f file, l symlink (link: its target), h hardlink (link: an earlier
entry's path), p FIFO, w whiteout (overlayfs: a 0:0 character device), E end of section.
Layers hold no other device nodes (sandboxes lack CAP_MKNOD, image imports drop them), so
none is ever written. Sockets are skipped: CRIU re-creates the ones it restores.

Reading is hostile input (`write_tree`): names are relative, without `..`, NUL or empty
components; every parent is opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
from the layer's root fd (`fdwalk.open_beneath`), entries are made with *at() calls on one
name and O_EXCL / O_NOFOLLOW, so nothing is written through a symlink or outside the
layer; overlay xattrs other than the opaque mark are refused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Iterator

import structlog

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.core.fdwalk import (OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, open_beneath,
                                  proc_fd_path, walk_tree)
from deltabox.core.transfer_key import sign
from deltabox.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

__all__ = ["FORMAT", "STORE_FORMAT", "ChunkWriter", "ChunkReader", "Section", "tree_records",
           "write_tree", "digest_of_tree", "chain_hash", "MAX_DEPTH"]

log = structlog.get_logger("deltabox.core.transfer")

FORMAT = "deltabox-checkpoint/1"
STORE_FORMAT = "overlay-xfs/1"   # layers: overlayfs format, whiteouts as 0:0 char devices
BLOCK = 1 << 20                  # record bytes per data chunk (one block)
SAMPLE = 64 << 10                # bytes of a block deflated to judge it
READ = 1 << 20                   # bytes read from a file at a time
ZLIB_LEVEL = 1
MAX_DEPTH = 512                  # directories in an entry's path
MAX_NAME = 64 << 10              # bytes of a name, link target or xattr block
# A file larger than this and than 16x what it stores is refused at export (see tree_records).
SPARSE_SLACK = 64 << 20
_HEAD = struct.Struct(">cIIIqQHHI")
_XATTR = struct.Struct(">HI")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# ---- chunks and their checksums ---------------------------------------------------------------

def _hash_part(h, chunk: pb.ExportChunk) -> int:
    """Add the chunk's part (its name, length and bytes) to the running hash `h`;
    returns the part's size."""
    which = chunk.WhichOneof("part")
    if which is None:
        raise InvalidArgument("transfer stream: a chunk without a part")
    body = getattr(chunk, which) if which in ("data", "stored") else \
        getattr(chunk, which).SerializeToString(deterministic=True)
    h.update(which.encode() + b"\0" + len(body).to_bytes(8, "big"))
    h.update(body)
    return len(body)


def chain_hash(chunks) -> Iterator[pb.ExportChunk]:
    """(Re)compute every chunk's running_sha256, in order: what a writer does, and what a
    test does to a stream it edited on purpose."""
    h = hashlib.sha256()
    for c in chunks:
        _hash_part(h, c)
        c.running_sha256 = h.digest()
        yield c


class ChunkWriter:
    """Frames a stream: manifest, sections (records in, blocks out), trailer."""

    def __init__(self, level: int = ZLIB_LEVEL):
        self._h = hashlib.sha256()
        self.level = level
        self.chunks = 0
        self.data_bytes = 0          # block bytes sent (deflated or stored)
        self.stored_blocks = 0
        self._section = None
        self._raw = 0
        self._block = bytearray()

    def _emit(self, chunk: pb.ExportChunk) -> pb.ExportChunk:
        _hash_part(self._h, chunk)
        chunk.running_sha256 = self._h.digest()
        self.chunks += 1
        return chunk

    def manifest(self, m: pb.Manifest) -> pb.ExportChunk:
        return self._emit(pb.ExportChunk(manifest=m))

    def start(self, kind: str, digest: str = "") -> pb.ExportChunk:
        self._section = hashlib.sha256()
        self._raw = 0
        self._block = bytearray()
        return self._emit(pb.ExportChunk(start=pb.ExportSectionStart(kind=kind, digest=digest)))

    def feed(self, raw: bytes) -> Iterator[pb.ExportChunk]:
        self._section.update(raw)
        self._raw += len(raw)
        self._block += raw
        while len(self._block) >= BLOCK:
            block = bytes(self._block[:BLOCK])
            del self._block[:BLOCK]
            yield self._data(block)

    def _data(self, block: bytes) -> pb.ExportChunk:
        """One block, deflated -- unless a sample of it does not shrink by a tenth
        (CRIU pages of random or already compressed data): then stored, which costs a
        sample's deflate instead of the whole block's."""
        sample = block[:SAMPLE]
        if self.level and len(zlib.compress(sample, self.level)) < 0.9 * len(sample):
            data = zlib.compress(block, self.level)
            chunk = pb.ExportChunk(data=data) if len(data) < len(block) else \
                pb.ExportChunk(stored=block)
        else:
            chunk = pb.ExportChunk(stored=block)
        if chunk.WhichOneof("part") == "stored":
            self.stored_blocks += 1
        self.data_bytes += len(chunk.data) + len(chunk.stored)
        return self._emit(chunk)

    def end(self) -> Iterator[pb.ExportChunk]:
        """The section's last block and its end; `self.last_sha256` is its digest."""
        if self._block:
            yield self._data(bytes(self._block))
            self._block = bytearray()
        self.last_sha256 = "sha256:" + self._section.hexdigest()
        yield self._emit(pb.ExportChunk(end=pb.ExportSectionEnd(sha256=self.last_sha256,
                                                                raw_bytes=self._raw)))

    def trailer(self, layers_sent: int, layers_skipped: int,
                key: bytes | None = None) -> pb.ExportChunk:
        """The last chunk; with a transfer key it signs the stream so far
        (`transfer_key.sign` of the running sha256 before it)."""
        mac = sign(key, self._h.digest()) if key else b""
        return self._emit(pb.ExportChunk(trailer=pb.ExportTrailer(
            chunks=self.chunks + 1, layers_sent=layers_sent, layers_skipped=layers_skipped,
            hmac_sha256=mac)))


class ChunkReader:
    """Checks a stream chunk by chunk (running sha256, order of parts) and hands out its
    manifest, sections (`Section`, a reader of their records) and trailer."""

    def __init__(self, chunks):
        self._it = iter(chunks)
        self._h = hashlib.sha256()
        self.n = 0
        self.bytes = 0
        self._pushed = None
        self.sha256_before_last = b""   # the running sha256 before the last chunk read

    def next(self, what: str) -> pb.ExportChunk:
        if self._pushed is not None:
            c, self._pushed = self._pushed, None
            return c
        try:
            c = next(self._it)
        except StopIteration:
            raise InvalidArgument(f"transfer stream truncated: it ended after {self.n} "
                                  f"chunk(s), expecting {what}") from None
        self.n += 1
        self.sha256_before_last = self._h.digest()
        self.bytes += _hash_part(self._h, c)
        if c.running_sha256 != self._h.digest():
            raise InvalidArgument(f"transfer stream corrupt: checksum mismatch at chunk "
                                  f"{self.n} ({c.WhichOneof('part')})")
        return c

    def push_back(self, c: pb.ExportChunk) -> None:
        self._pushed = c

    def manifest(self) -> pb.Manifest:
        c = self.next("its manifest")
        if c.WhichOneof("part") != "manifest":
            raise InvalidArgument("transfer stream: it does not start with a manifest")
        return c.manifest

    def expect_end_of_stream(self) -> None:
        for _ in self._it:
            raise InvalidArgument("transfer stream: chunks after its trailer")


class Section:
    """The records of one section, block by block, checked at its end."""

    def __init__(self, reader: ChunkReader, start: pb.ExportSectionStart):
        self.start = start
        self._r = reader
        self._h = hashlib.sha256()
        self._buf = bytearray()
        self.raw = 0
        self.sha256 = ""

    def _next_block(self, what: str) -> bytes:
        c = self._r.next(what)
        part = c.WhichOneof("part")
        if part == "stored":
            block = c.stored
        elif part == "data":
            block = _inflate(c.data)
        else:
            self._r.push_back(c)
            return b""
        if not block or len(block) > BLOCK:
            raise InvalidArgument(f"transfer stream corrupt: a block of {len(block)} bytes")
        self._h.update(block)
        self.raw += len(block)
        return block

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            block = self._next_block("section data")
            if not block:
                raise InvalidArgument(f"transfer stream: section {self.start.kind} ends "
                                      "inside a record (truncated section)")
            self._buf += block
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def finish(self) -> None:
        """After the end record: no data may follow; then the `end` chunk, checked."""
        if self._buf or self._next_block("a section end"):
            raise InvalidArgument("transfer stream: bytes after a section's end record")
        c = self._r.next("a section end")
        if c.WhichOneof("part") != "end":
            raise InvalidArgument("transfer stream: a section is not closed by its end")
        self.sha256 = "sha256:" + self._h.hexdigest()
        if c.end.sha256 != self.sha256 or c.end.raw_bytes != self.raw:
            raise InvalidArgument(f"transfer stream corrupt: section {self.start.kind} "
                                  f"{self.start.digest} does not match its sha256")


def _inflate(data: bytes) -> bytes:
    """One deflated block, at most BLOCK bytes once inflated (a small chunk cannot fill
    memory); zlib's own errors are the stream's fault."""
    z = zlib.decompressobj()
    try:
        out = z.decompress(data, BLOCK + 1)
    except zlib.error as e:
        raise InvalidArgument(f"transfer stream corrupt: {e}") from None
    if len(out) > BLOCK or not z.eof or z.unused_data:
        raise InvalidArgument("transfer stream corrupt: a block that does not inflate to "
                              "one block")
    return out


# ---- a tree as records ----------------------------------------------------------------------

def _xattr_blob(path: str) -> bytes:
    out = []
    for key in sorted(os.listxattr(path, follow_symlinks=False)):
        value = os.getxattr(path, key, follow_symlinks=False)
        k = key.encode()
        out.append(_XATTR.pack(len(k), len(value)) + k + value)
    return b"".join(out)


def _head(kind: bytes, st: os.stat_result | None, name: str, link: str = "", xattrs=b"",
          size: int = 0) -> bytes:
    n, lk = name.encode("utf-8", "surrogateescape"), link.encode("utf-8", "surrogateescape")
    mode, uid, gid, mtime = ((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
                             if st is not None else (0, 0, 0, 0))
    return _HEAD.pack(kind, mode, uid, gid, mtime, size, len(n), len(lk), len(xattrs)) \
        + n + lk + xattrs


def tree_records(root: Path) -> Iterator[bytes]:
    """The records of the tree at `root` (a layer or an images dir), sorted by path.
    Walked fd-relative, following no symlink (`fdwalk.walk_tree`)."""
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        entries = []
        for rel, st, dir_fd, name in walk_tree(root_fd):
            kind, link = b"", ""
            if stat.S_ISDIR(st.st_mode):
                kind = b"d"
            elif stat.S_ISREG(st.st_mode):
                kind = b"f"
            elif stat.S_ISLNK(st.st_mode):
                kind, link = b"l", os.readlink(name, dir_fd=dir_fd)
            elif stat.S_ISFIFO(st.st_mode):
                kind = b"p"
            elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                kind = b"w"
            elif stat.S_ISSOCK(st.st_mode):
                log.info("transfer.socket_skipped", path=rel)
                continue
            else:
                raise FailedPrecondition(f"layer entry {rel!r} is a device node; layers "
                                         "never hold device nodes, refusing to export it")
            parts, xattrs = tuple(rel.split("/")), _xattr_blob(proc_fd_path(dir_fd, name))
            # What an import refuses is refused here: a stream no daemon can import is
            # no export (MakeDir allows deeper paths; XFS, larger xattrs).
            if kind == b"f" and st.st_size > max(SPARSE_SLACK, 16 * 512 * st.st_blocks):
                # The stream carries every byte (it has no holes), and the target writes
                # them: `truncate -s 8E` in a sandbox would take forever to export.
                raise FailedPrecondition(
                    f"layer entry {rel[:200]!r} is a sparse file ({st.st_size:,} bytes, "
                    f"{512 * st.st_blocks:,} of them stored): a transfer stream does not "
                    "keep holes, refusing to export it")
            if len(parts) > MAX_DEPTH or len(xattrs) > MAX_NAME:
                what = (f"is nested {len(parts)} directories deep (at most {MAX_DEPTH})"
                        if len(parts) > MAX_DEPTH else
                        f"has {len(xattrs):,} bytes of xattrs (at most {MAX_NAME:,})")
                raise FailedPrecondition(f"layer entry {rel[:200]!r} {what}: a transfer "
                                         "stream cannot hold it, refusing to export")
            entries.append((parts, kind, st, link, xattrs))
        entries.sort(key=lambda e: e[0])
        # The root's mtime is left out: a layer dir's own time is when it was made here,
        # not content, and two daemons holding the same layer must agree on its digest.
        root_st, root_x = os.fstat(root_fd), _xattr_blob(proc_fd_path(root_fd, "."))
        yield _HEAD.pack(b"d", stat.S_IMODE(root_st.st_mode), root_st.st_uid, root_st.st_gid,
                         0, 0, 0, 0, len(root_x)) + root_x
        seen: dict[tuple[int, int], str] = {}
        for parts, kind, st, link, xattrs in entries:
            rel = "/".join(parts)
            if kind != b"d" and st.st_nlink > 1:
                first = seen.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    yield _head(b"h", st, rel, first)
                    continue
            if kind != b"f":
                yield _head(kind, st, rel, link, xattrs)
                continue
            yield _head(b"f", st, rel, xattrs=xattrs, size=st.st_size)
            yield from _file_data(root_fd, rel, st.st_size)
        yield _head(b"E", None, "")
    finally:
        os.close(root_fd)


def _file_data(root_fd: int, rel: str, size: int) -> Iterator[bytes]:
    fd = open_beneath(root_fd, rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        left = size
        while left:
            data = os.read(fd, min(READ, left))
            if not data:
                raise FailedPrecondition(f"layer file {rel!r} shrank while exported "
                                         "(layers are immutable)")
            left -= len(data)
            yield data
    finally:
        os.close(fd)


def digest_of_tree(root: Path) -> tuple[str, int]:
    """(sha256 digest, bytes) of the tree's records: the content address of a layer."""
    h, n = hashlib.sha256(), 0
    for piece in tree_records(root):
        h.update(piece)
        n += len(piece)
    return "sha256:" + h.hexdigest(), n


# ---- records into a tree (hostile input) ------------------------------------------------------

def _components(name: str, where: str) -> tuple[str, ...]:
    if "\0" in name:
        raise InvalidArgument(f"{where}: entry {name[:200]!r} contains a NUL byte")
    if name.startswith("/"):
        raise InvalidArgument(f"{where}: entry {name[:200]!r} is an absolute path")
    parts = tuple(name.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{where}: entry {name[:200]!r} has an empty, '.' or '..' "
                              "component")
    if len(parts) > MAX_DEPTH:
        raise InvalidArgument(f"{where}: entry {name[:200]!r} is nested too deep")
    return parts


def _parse_xattrs(blob: bytes, where: str) -> list[tuple[str, bytes]]:
    out, i = [], 0
    while i < len(blob):
        if i + _XATTR.size > len(blob):
            raise InvalidArgument(f"{where}: a malformed xattr block")
        kl, vl = _XATTR.unpack_from(blob, i)
        i += _XATTR.size
        if i + kl + vl > len(blob):
            raise InvalidArgument(f"{where}: a malformed xattr block")
        key = blob[i:i + kl].decode("utf-8", "surrogateescape")
        out.append((key, blob[i + kl:i + kl + vl]))
        i += kl + vl
        if key.startswith(OVERLAY_XATTR_PREFIX) and key != OPAQUE_XATTR:
            raise InvalidArgument(f"{where}: overlay xattr {key!r} is not allowed in a layer")
    return out


def write_tree(section: Section, root: Path, where: str) -> int:
    """Write a section's records below the directory `root` (made empty by the caller);
    returns the entries written. Nothing is written outside `root` (see the module doc)."""
    root_fd = os.open(root, _DIR_FLAGS)
    dir_times: list[tuple[tuple[str, ...], int]] = []
    count = 0
    try:
        while True:
            kind, mode, uid, gid, mtime, size, nl, ll, xl = _HEAD.unpack(
                section.read(_HEAD.size))
            if max(nl, ll, xl) > MAX_NAME:
                raise InvalidArgument(f"{where}: a record with an oversized name")
            name = section.read(nl).decode("utf-8", "surrogateescape")
            link = section.read(ll).decode("utf-8", "surrogateescape")
            xattrs = _parse_xattrs(section.read(xl), f"{where}: {name[:200]!r}")
            if kind == b"E":
                break
            if count == 0:
                if kind != b"d" or name:
                    raise InvalidArgument(f"{where}: a section must start with its root "
                                          "directory")
                try:
                    _meta(root_fd, uid, gid, mode, xattrs)
                except OSError as e:
                    raise _entry_error(f"{where}: its root directory", e) from e
                count = 1
                continue
            parts = _components(name, where)
            try:
                _write_entry(section, root_fd, parts, kind, mode, uid, gid, mtime, size,
                             link, xattrs, dir_times, where)
            except OSError as e:
                raise _entry_error(f"{where}: {name[:200]!r}", e) from e
            count += 1
        for parts, ns in sorted(dir_times, key=lambda t: -len(t[0])):
            fd = os.dup(root_fd) if not parts else open_beneath(
                root_fd, "/".join(parts), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)
        return count
    finally:
        os.close(root_fd)


def _write_entry(section, root_fd, parts, kind, mode, uid, gid, mtime, size, link, xattrs,
                 dir_times, where) -> None:
    leaf = parts[-1]
    pfd = (os.dup(root_fd) if len(parts) == 1 else
           open_beneath(root_fd, "/".join(parts[:-1]), os.O_RDONLY | os.O_DIRECTORY))
    try:
        if kind != b"f" and size:
            raise InvalidArgument(f"{where}: {'/'.join(parts)[:200]!r}: only files carry data")
        if kind == b"d":
            os.mkdir(leaf, 0o700, dir_fd=pfd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
            try:
                _meta(fd, uid, gid, mode, xattrs)
            finally:
                os.close(fd)
            dir_times.append((parts, mtime))
        elif kind == b"f":
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                left = size
                while left:
                    data = section.read(min(READ, left))
                    os.write(fd, data)
                    left -= len(data)
                _meta(fd, uid, gid, mode, xattrs)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        elif kind in (b"l", b"p", b"w"):
            if kind == b"l":
                if not link:
                    raise InvalidArgument(f"{where}: a symlink with an empty target")
                os.symlink(link, leaf, dir_fd=pfd)
            elif kind == b"p":
                os.mkfifo(leaf, 0o600, dir_fd=pfd)
            else:
                os.mknod(leaf, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
            os.chown(leaf, uid, gid, dir_fd=pfd, follow_symlinks=False)
            if kind == b"p":  # made here just now: no symlink can be in its place
                os.chmod(leaf, mode, dir_fd=pfd)
            for key, value in xattrs:
                os.setxattr(proc_fd_path(pfd, leaf), key, value, follow_symlinks=False)
            os.utime(leaf, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
        elif kind == b"h":
            target = _components(link, where)
            tfd = (os.dup(root_fd) if len(target) == 1 else
                   open_beneath(root_fd, "/".join(target[:-1]), os.O_RDONLY | os.O_DIRECTORY))
            try:
                st = os.lstat(target[-1], dir_fd=tfd)
                if stat.S_ISDIR(st.st_mode):
                    raise InvalidArgument(f"{where}: a hardlink to a directory ({link[:200]!r})")
                os.link(target[-1], leaf, src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            finally:
                os.close(tfd)
        else:
            raise InvalidArgument(f"{where}: {'/'.join(parts)[:200]!r}: unknown entry kind "
                                  f"{kind!r} (layers hold no device nodes)")
    finally:
        os.close(pfd)


def _meta(fd: int, uid: int, gid: int, mode: int, xattrs) -> None:
    os.fchown(fd, uid, gid)   # before chmod (it clears set-id bits) and xattrs
    os.fchmod(fd, mode & 0o7777)
    for key, value in xattrs:
        os.setxattr(fd, key, value)


def _entry_error(where: str, err: OSError) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{where}: the store is full")
    if err.errno == errno.ELOOP:
        return InvalidArgument(f"{where}: goes through a symlink; entries are never written "
                               "through symlinks")
    if err.errno == errno.EXDEV:
        return InvalidArgument(f"{where}: would leave its layer")
    if err.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EPERM,
                     errno.EINVAL, errno.ENAMETOOLONG, errno.EMLINK, errno.E2BIG, errno.ERANGE,
                     errno.EOPNOTSUPP):  # EOPNOTSUPP: an xattr namespace the store refuses
        return InvalidArgument(f"{where}: cannot be written: {os.strerror(err.errno)}")
    return err
