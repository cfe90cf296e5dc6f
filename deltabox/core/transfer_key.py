"""The transfer key: who may hand this daemon a FULL checkpoint, and how a stream proves it.

Why: a FULL checkpoint's CRIU images are restored by CRIU running as host root, into
sandboxes that have no user namespace (docs/security.md). The images say which credentials,
capabilities, seccomp filter, namespaces and open files the restored processes get; a
crafted one is a host-root escape. Layer records are validated entry by entry on import
(`transfer_format.write_tree`); CRIU images are not, and cannot sensibly be. So a FULL
checkpoint is imported only from a daemon this one trusts: one holding the same key.

How: the exporting daemon, when it has a key (`transfer-key-file`), puts in the stream's
trailer an HMAC-SHA256 of the running sha256 of the chunk before it -- which covers the
manifest and every section, so the whole stream is signed. The importing daemon checks it
at the trailer (`verify`), before anything it wrote is committed (the images and layers
wait under tmp/ until then). FS-only checkpoints stay importable unsigned (their records
are validated), unless `transfer-require-signature = true`.

The key file: at least 32 random bytes (`head -c 32 /dev/urandom`), a regular file owned
by root that group and others cannot read, not a symlink (`read_key_file`, checked when
the daemon starts). This module uses the standard library only (the config reads it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

__all__ = ["MIN_KEY_BYTES", "KeyFileError", "read_key_file", "sign", "refusal"]

MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
_DOMAIN = b"deltabox-checkpoint/1 trailer\0"   # a MAC of this, and of nothing else
FIX = ("give both daemons the same transfer-key-file (at least 32 random bytes, root-only; "
       "see docs/security.md, \"Importing checkpoints\") and export it again")


class KeyFileError(ValueError):
    """A key file that is missing, a symlink, readable by others, or too short."""


def read_key_file(path: str | os.PathLike) -> bytes:
    """The key in `path`: all its bytes. KeyFileError says which rule the file breaks."""
    path = os.fspath(path)
    try:
        # O_NOFOLLOW: a symlink is refused (ELOOP); O_NONBLOCK: a fifo cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if os.path.islink(path):
            raise KeyFileError(f"the transfer key file {path} is a symlink; name the file "
                               "itself") from None
        raise KeyFileError(f"cannot open the transfer key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the transfer key file {path} is not a regular file")
        if st.st_uid != 0:
            raise KeyFileError(f"the transfer key file {path} belongs to uid {st.st_uid}, "
                               f"not root: chown root: {path}")
        if st.st_mode & 0o077:
            raise KeyFileError(f"the transfer key file {path} is accessible by group or "
                               f"others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"the transfer key file {path} is longer than {MAX_KEY_BYTES} bytes")
    if len(data) < MIN_KEY_BYTES:
        raise KeyFileError(f"the transfer key file {path} holds {len(data)} bytes; it needs "
                           f"at least {MIN_KEY_BYTES} random ones (head -c 32 /dev/urandom "
                           f"> {path})")
    return data


def sign(key: bytes, stream_sha256: bytes) -> bytes:
    """The trailer's HMAC of the stream's running sha256 before the trailer."""
    return hmac.new(key, _DOMAIN + stream_sha256, hashlib.sha256).digest()


def refusal(key: bytes | None, mac: bytes, stream_sha256: bytes) -> str | None:
    """Why a stream whose trailer carries `mac` is not trusted by a daemon holding `key`
    (None: it is). The reason names the fix."""
    if key is None:
        return ("this daemon has no transfer key configured, so it trusts no exporter: set "
                "transfer-key-file here and on the exporting daemon (the same key; see "
                "docs/security.md, \"Importing checkpoints\")")
    if not mac:
        return f"the stream is not signed (its exporting daemon has no transfer key): {FIX}"
    if not hmac.compare_digest(mac, sign(key, stream_sha256)):
        return ("the stream is signed with another key than this daemon's (or was altered "
                f"after signing): {FIX}")
    return None
