"""Reading image formats: layer tarballs (plain, gzip, xz, zstd), `docker save`
archives, OCI archives and OCI layout directories, all of them hostile input.

Tar headers are parsed by `tarfile` with `_SafeTarInfo` (bounded, linear-time extended
headers; an archive must end where its headers say, at an end-of-archive block: a
corrupt header is an error, not the end of the archive), members are handed one
by one to a `LayerWriter` (`deltabox.core.image_layers`) as `Entry`s, and the files of an
archive or layout are found without leaving it (`Archive`). The limits below bound what a
malformed or malicious image can make the importer read or parse; the rules as a whole
are in `deltabox.core.images`' docstring.
"""

from __future__ import annotations

import errno
import gzip
import json
import lzma
import os
import posixpath
import re
import stat
import subprocess
import tarfile
import threading
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from deltabox.host import linux
from deltabox.core.image_layers import (Entry, ImportBudget, LayerWriter, Progress,
                                        report_warnings, shown)
from deltabox.errors import InvalidArgument
from deltabox.store.metadata import Store

__all__ = ["unpack_layer", "compression", "top_level_names", "open_archive", "Archive",
           "docker_layers", "oci_layers", "reopen_regular", "CHUNK"]

CHUNK = 1 << 20
MAX_META_BYTES = 1 << 20        # one pax header or GNU long name (an xattr value is <= 64 KiB)
MAX_META_CHAIN = 8              # extended headers before one member
MAX_GLOBAL_PAX_BYTES = 1 << 20  # all global pax headers of one archive
MAX_LAYERS = 128
MAX_INDEX_DEPTH = 8             # OCI index -> index -> ... -> manifest
MAX_JSON_BYTES = 16 << 20       # manifest.json, index.json, manifest and config blobs
MAX_LINK_HOPS = 16              # symlinks/hardlinks followed to find an archive member
MAX_ARCHIVE_MEMBERS = 100_000   # members of a docker-save/OCI tar (layers are members)
_BENEATH = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_MAGICLINKS
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# ---- tar layers -----------------------------------------------------------------------------

class _Malformed(InvalidArgument):
    """Raised inside tarfile's parsing: not a HeaderError, so tarfile cannot swallow it."""


_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
               tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class _SafeTarInfo(tarfile.TarInfo):
    """tarfile's header parsing with bounds (see the module's docstring)."""

    def _proc_member(self, tf):
        if self.type in _META_TYPES:
            if self.size > MAX_META_BYTES:
                raise _Malformed(f"extended tar header of {self.size:,} bytes (at most "
                                 f"{MAX_META_BYTES:,})")
            tf.dbx_chain += 1
            if tf.dbx_chain > MAX_META_CHAIN:
                raise _Malformed(f"more than {MAX_META_CHAIN} extended tar headers in a row")
            if tf.dbx_budget is not None:
                tf.dbx_budget.data("tar headers", self.size)
            if self.type == tarfile.XGLTYPE:
                tf.dbx_global += self.size
                if tf.dbx_global > MAX_GLOBAL_PAX_BYTES:
                    raise _Malformed("global pax headers larger than "
                                     f"{MAX_GLOBAL_PAX_BYTES:,} bytes")
        else:
            tf.dbx_chain = 0
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise _Malformed(f"{shown(self.name)}: sparse files are not supported")
        return super()._proc_member(tf)

    def _proc_pax(self, tf):
        """tarfile's own _proc_pax (as in 3.11 to 3.13) with a linear-time record parser
        and no sparse files."""
        buf = tf.fileobj.read(self._block(self.size))
        pax_headers = tf.pax_headers if self.type == tarfile.XGLTYPE else tf.pax_headers.copy()
        records = _pax_records(buf[:self.size])
        encoding = "utf-8"
        for key, value in records:
            if key == b"hdrcharset":
                pax_headers["hdrcharset"] = value.decode("utf-8", "replace")
                if value == b"BINARY":
                    encoding = tf.encoding
        for key, value in records:
            k = self._decode_pax_field(key, "utf-8", "utf-8", tf.errors)
            if k.startswith("GNU.sparse."):
                raise _Malformed("sparse files are not supported")
            if k in tarfile.PAX_NAME_FIELDS:
                v = self._decode_pax_field(value, encoding, tf.encoding, tf.errors)
            else:
                v = self._decode_pax_field(value, "utf-8", "utf-8", tf.errors)
            pax_headers[k] = v
        try:
            nxt = self.fromtarfile(tf)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            nxt._apply_pax_info(pax_headers, tf.encoding, tf.errors)
            nxt.offset = self.offset
            if nxt.size < 0:
                raise _Malformed(f"{shown(nxt.name)}: negative size")
            if "size" in pax_headers:
                offset = nxt.offset_data
                if nxt.isreg() or nxt.type not in tarfile.SUPPORTED_TYPES:
                    offset += nxt._block(nxt.size)
                tf.offset = offset
        return nxt


def _pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The "LENGTH KEY=VALUE\\n" records of a pax header, parsed in linear time."""
    out, pos = [], 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        if space <= pos or not data[pos:space].isdigit():
            raise _Malformed("not a valid tar archive (bad pax header record)")
        end = pos + int(data[pos:space])
        if end <= space + 2 or end > len(data) or data[end - 1] != 0x0A:
            raise _Malformed("not a valid tar archive (bad pax header record length)")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise _Malformed("not a valid tar archive (bad pax header record)")
        out.append((key, value))
        pos = end
    return out


class _HeaderTap:
    """The archive's file object, keeping its last one-block read and where it began:
    after the last member, the block that ended the archive (a stream cannot re-read)."""

    def __init__(self, f):
        self._f = f
        self.last: tuple[int, bytes] | None = None

    def read(self, n: int = -1) -> bytes:
        pos = self._f.tell()
        data = self._f.read(n)
        if n == tarfile.BLOCKSIZE:  # how tarfile reads a header
            self.last = (pos, data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)


class _SafeTarFile(tarfile.TarFile):
    """Refuses an archive unless it ends where its headers' sizes say, at an end-of-archive
    block or the end of the data: tarfile takes a corrupt header after the first member for
    the end (and newer tarfiles, e.g. Ubuntu 24.04's 3.12.3, no longer call an overridden
    `TarInfo.frombuf`), which would import the archive cut short."""
    tarinfo = _SafeTarInfo

    def __init__(self, *args, **kw):
        self.dbx_chain = 0
        self.dbx_global = 0
        self.dbx_budget: ImportBudget | None = None
        super().__init__(*args, **kw)  # reads the first member in read modes
        self.fileobj = _HeaderTap(self.fileobj)

    def next(self):
        m = super().next()
        if m is None and self.offset != 0:  # at offset 0 tarfile refuses a bad header
            pos, data = self.fileobj.last or (-1, b"")
            if pos != self.offset or len(data) not in (0, tarfile.BLOCKSIZE):
                raise _Malformed("not a valid tar archive (it ends inside a member or a "
                                 f"header, at byte {self.offset:,})")
            if data.count(0) != len(data):
                raise _Malformed(f"not a valid tar archive (bad header at byte "
                                 f"{self.offset:,}: neither a member nor the end)")
        return m


def _members(tf: _SafeTarFile) -> Iterator[tarfile.TarInfo]:
    """Members one by one, not kept (TarFile.__iter__ keeps them all in memory)."""
    while True:
        m = tf.next()
        tf.members.clear()
        if m is None:
            return
        yield m


_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)
_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
          tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
          tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "chardev", tarfile.BLKTYPE: "blockdev"}


def _entry_of(m: tarfile.TarInfo, phase: str) -> Entry:
    kind = _KINDS.get(m.type)
    if kind is None:
        raise InvalidArgument(f"{phase}: {shown(m.name)}: unsupported tar entry type "
                              f"{m.type!r}")
    if m.size < 0:
        raise InvalidArgument(f"{phase}: {shown(m.name)}: negative size")
    for what, v in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= v < 0xFFFFFFFF:
            raise InvalidArgument(f"{phase}: {shown(m.name)}: {what} {v} is out of range")
    try:
        mtime_ns = max(min(int(m.mtime * 1_000_000_000), 2**63 - 1), -2**63)
    except (OverflowError, ValueError):
        mtime_ns = 0
    xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
              for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return Entry(m.name, kind, m.mode & 0o7777, m.uid, m.gid, mtime_ns, m.linkname, xattrs)


def unpack_layer(store: Store, raw: BinaryIO, total: int, phase: str, budget: ImportBudget,
                 progress: Progress, layer_dirs: list[Path]) -> None:
    """Unpack one (possibly compressed) layer tarball into a new tmp dir."""
    dst = store.new_tmp_dir()
    layer_dirs.append(dst)
    peek = _Peek(raw)
    kind = _magic(peek.head)
    counted = _Counting(peek, total, phase, progress)
    zstd = None
    if kind == "gzip":
        stream: BinaryIO = gzip.GzipFile(fileobj=counted)  # type: ignore[arg-type]
    elif kind == "xz":
        stream = lzma.LZMAFile(counted)  # type: ignore[arg-type]
    elif kind == "zstd":  # no stdlib module before 3.14: the zstd binary
        stream = zstd = _ZstdPipe(counted)  # type: ignore[assignment]
    else:
        stream = counted  # type: ignore[assignment]
    try:
        with LayerWriter(dst, phase, budget) as writer:
            try:
                with _SafeTarFile.open(fileobj=_Bounded(stream, budget), mode="r|",
                                       encoding="utf-8", errors="surrogateescape") as tf:
                    tf.dbx_budget = budget
                    for m in _members(tf):
                        where = f"{phase}: {shown(m.name)}"
                        budget.entry(where)
                        if m.isreg() or m.size:
                            budget.data(where, max(m.size, 0))
                        e = _entry_of(m, phase)
                        writer.add(e, _copy_member(tf, m) if e.kind == "file" else None)
            except _Malformed as e:
                raise InvalidArgument(f"{phase}: {e.message}") from None
            except _TAR_ERRORS as e:
                raise InvalidArgument(f"{phase}: not a valid tar archive: {e}") from e
            except RecursionError as e:
                raise InvalidArgument(f"{phase}: tar headers nested too deeply") from e
            if zstd is not None:
                zstd.check(phase)
        report_warnings(writer, progress)
    finally:
        if zstd is not None:
            zstd.close()
    progress(phase, total, total)


def _copy_member(tf: tarfile.TarFile, m: tarfile.TarInfo) -> Callable[[int], None]:
    def copy(fd: int) -> None:
        src = tf.extractfile(m)
        assert src is not None
        while chunk := src.read(CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
    return copy


class _Bounded:
    """Counts the decompressed tar stream against the budget (headers are not file data)."""

    def __init__(self, f, budget: ImportBudget):
        self.f, self.budget = f, budget

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.budget.stream(len(data))
        return data


class _ZstdPipe:
    """Decompress through `zstd -d`, fed from a thread."""

    def __init__(self, src):
        self.proc = subprocess.Popen(["zstd", "-d", "-c", "-q"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._feed, args=(src,), daemon=True)
        self.thread.start()

    def _feed(self, src) -> None:
        try:
            while chunk := src.read(CHUNK):
                self.proc.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as e:  # noqa: BLE001 -- re-raised by check()
            self.error = e
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def check(self, phase: str) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        self.thread.join()
        self.proc.stderr.close()


def compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        return _magic(f.read(6))


def _magic(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


class _Peek:
    """Wrap a stream so its first bytes can be inspected and then re-read."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.head = f.read(6)

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.f.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out + (self.f.read(n - len(out)) if len(out) < n else b"")
        return self.f.read(n)


class _Counting:
    def __init__(self, f, total: int, phase: str, progress: Progress):
        self.f, self.total, self.phase, self.progress = f, total, phase, progress
        self.done = 0
        self._last = -1

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.done += len(data)
        step = self.done * 50 // max(self.total, 1)  # ~50 reports per layer
        if step != self._last:
            self._last = step
            self.progress(self.phase, self.done, self.total)
        return data


def reopen_regular(path_fd: int, where: str, expect: os.stat_result | None = None) -> int:
    """Open an O_PATH fd for reading, if it is a regular file (the same one, if `expect`):
    never opens a FIFO (it would block) or a device (it could act)."""
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{where}: not a regular file")
        if expect is not None and (st.st_ino, st.st_dev) != (expect.st_ino, expect.st_dev):
            raise InvalidArgument(f"{where}: changed while it was imported")
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


# ---- docker save / OCI ----------------------------------------------------------------------

class Archive:
    """The files of a docker-save archive, an OCI archive or an OCI layout directory,
    found without leaving it: names are checked, symlinks followed only inside."""

    def __init__(self, source: Path):
        self.source = source

    def open_member(self, rel: str) -> tuple[BinaryIO, int]:
        raise NotImplementedError

    def read_json(self, rel: str, what: str | None = None):
        what = what or rel
        f, size = self.open_member(rel)
        with f:
            if size > MAX_JSON_BYTES:
                raise InvalidArgument(f"{self.source}: {what} is {size:,} bytes (metadata "
                                      f"is at most {MAX_JSON_BYTES:,})")
            data = f.read(MAX_JSON_BYTES + 1)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"{self.source}: malformed metadata: {what} is not valid "
                                  f"JSON ({str(e)[:100]})") from None

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _name(self, rel: str) -> str:
        if "\0" in rel or rel.startswith("/") or ".." in rel.split("/"):
            raise InvalidArgument(f"{self.source}: {shown(rel)} points outside the archive")
        name = posixpath.normpath(rel)
        if name in (".", ""):
            raise InvalidArgument(f"{self.source}: {shown(rel)} is not a file of the "
                                  "archive")
        return name


class _DirArchive(Archive):
    def __init__(self, source: Path):
        super().__init__(source)
        self.fd = os.open(source, _DIR_FLAGS)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def open_member(self, rel: str) -> tuple[BinaryIO, int]:
        name = self._name(rel)
        where = f"{self.source}: {shown(name)}"
        try:
            # Symlinks inside the layout are followed; out of it (absolute, `..`) not.
            pfd = linux.openat2(self.fd, name, os.O_PATH, 0, _BENEATH)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise InvalidArgument(f"{where}: a symlink that points outside the "
                                      "image layout") from None
            if e.errno == errno.ELOOP:
                raise InvalidArgument(f"{where}: a symlink loop") from None
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise InvalidArgument(f"{self.source}: image layout lacks {shown(name)}"
                                      ) from None
            raise
        fd = reopen_regular(pfd, where)
        f = os.fdopen(fd, "rb")
        return f, os.fstat(fd).st_size


class _TarArchive(Archive):
    def __init__(self, source: Path):
        super().__init__(source)
        self.tf = _SafeTarFile.open(source, mode="r:", encoding="utf-8",
                                    errors="surrogateescape")
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for i, m in enumerate(_members(self.tf)):
                if i >= MAX_ARCHIVE_MEMBERS:
                    raise InvalidArgument(f"{source}: more than {MAX_ARCHIVE_MEMBERS:,} "
                                          "archive members")
                key = _member_key(m.name)
                if key is not None:
                    self.members[key] = m  # a later member of the same name wins
        except _TAR_ERRORS as e:
            self.tf.close()
            raise InvalidArgument(f"{source}: not a valid tar archive: {e}") from e
        except BaseException:
            self.tf.close()
            raise

    def __exit__(self, *exc) -> None:
        self.tf.close()

    def open_member(self, rel: str) -> tuple[BinaryIO, int]:
        name = self._name(rel)
        m = self.members.get(name)
        if m is None:
            raise InvalidArgument(f"{self.source}: archive lacks {shown(rel)}")
        for _ in range(MAX_LINK_HOPS):
            if m.issym():
                link = m.linkname
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
                if link.startswith("/") or target == ".." or target.startswith("../"):
                    raise InvalidArgument(f"{self.source}: {shown(name)} is a symlink that "
                                          f"points outside the archive ({shown(link)})")
            elif m.islnk():
                target = _member_key(m.linkname) or ""
            else:
                break
            name = target
            m = self.members.get(name)
            if m is None:
                raise InvalidArgument(f"{self.source}: archive lacks {shown(name)} (a link "
                                      f"target of {shown(rel)})")
        else:
            raise InvalidArgument(f"{self.source}: {shown(rel)}: more than {MAX_LINK_HOPS} "
                                  "symlinks/hardlinks to follow (a loop)")
        if not m.isreg():
            raise InvalidArgument(f"{self.source}: {shown(rel)} is not a regular file")
        f = self.tf.extractfile(m)
        assert f is not None
        return f, m.size


def _member_key(name: str) -> str | None:
    """An archive member's name as manifests name it; None if no manifest can."""
    while name.startswith("./"):
        name = name[2:]
    if not name or name.startswith("/") or ".." in name.split("/"):
        return None
    return posixpath.normpath(name)


def top_level_names(source: Path, wanted: set[str]) -> set[str]:
    """Which of `wanted` an uncompressed tar has (by its headers; unreadable: none)."""
    found: set[str] = set()
    try:
        with _SafeTarFile.open(source, mode="r:") as tf:
            for i, m in enumerate(_members(tf)):
                if i >= MAX_ARCHIVE_MEMBERS:
                    return set()  # no docker/OCI archive has that many: a rootfs
                key = _member_key(m.name)
                if key in wanted:
                    found.add(key)
    except (*_TAR_ERRORS, InvalidArgument, RecursionError):
        return set()  # not an archive of ours: unpacking it as a rootfs will say why
    return found


def open_archive(source: Path) -> Archive:
    return _DirArchive(source) if source.is_dir() else _TarArchive(source)


def docker_layers(archive: Archive) -> list[str]:
    manifest = archive.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
        raise InvalidArgument(f"{archive.source}: malformed docker-archive metadata: "
                              "manifest.json is not a list of images")
    layers = manifest[0].get("Layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise InvalidArgument(f"{archive.source}: malformed docker-archive metadata: "
                              "manifest.json's Layers is not a list of paths")
    return _check_layer_count(archive, layers)


_INDEX_KEY = "manifests"


def oci_layers(archive: Archive) -> list[str]:
    """Layer blobs of the first image of the layout: index -> (index ->)* manifest."""
    doc = archive.read_json("index.json")
    seen: set[str] = set()
    for _ in range(MAX_INDEX_DEPTH + 1):
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{archive.source}: malformed oci metadata: not an object")
        if _INDEX_KEY in doc:
            entries = doc[_INDEX_KEY]
            if not isinstance(entries, list) or not entries:
                raise InvalidArgument(f"{archive.source}: malformed oci metadata: an index "
                                      "without manifests")
            path = _blob(archive, entries[0])
            if path in seen:
                raise InvalidArgument(f"{archive.source}: malformed oci metadata: an index "
                                      f"cycle ({path} is reached twice)")
            seen.add(path)
            doc = archive.read_json(path)
            continue
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise InvalidArgument(f"{archive.source}: malformed oci metadata: a manifest "
                                  "without layers")
        return _check_layer_count(archive, [_blob(archive, d) for d in layers])
    raise InvalidArgument(f"{archive.source}: malformed oci metadata: indexes nested deeper "
                          f"than {MAX_INDEX_DEPTH}")


# OCI image-spec descriptor digests: algorithm ":" encoded, neither can hold "/" or "..".
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def _blob(archive: Archive, desc) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"{archive.source}: malformed oci metadata: invalid digest "
                              f"{str(digest)[:100]!r}")
    algo, _, encoded = digest.partition(":")
    return f"blobs/{algo}/{encoded}"


def _check_layer_count(archive: Archive, layers: list[str]) -> list[str]:
    if len(layers) > MAX_LAYERS:
        raise InvalidArgument(f"{archive.source}: {len(layers)} layers (at most {MAX_LAYERS})")
    return layers
