"""One errno -> error mapping (deltabox.errors.error_from_errno), used by the sandbox's file
calls (core/files.py) and by the init protocol (host/initproto.py) alike."""

from __future__ import annotations

import errno

import pytest

import deltabox
from deltabox.errors import error_from_errno
from deltabox.host.initproto import error_from_fail

TABLE = [
    (errno.ENOENT, deltabox.PathNotFound), (errno.ENOTDIR, deltabox.PathNotFound),
    (errno.EEXIST, deltabox.AlreadyExists),
    (errno.EACCES, deltabox.PermissionDenied), (errno.EPERM, deltabox.PermissionDenied),
    (errno.EXDEV, deltabox.PermissionDenied), (errno.EROFS, deltabox.PermissionDenied),
    (errno.ENOMEM, deltabox.ResourceExhausted), (errno.EAGAIN, deltabox.ResourceExhausted),
    (errno.ENOSPC, deltabox.ResourceExhausted), (errno.EDQUOT, deltabox.ResourceExhausted),
    (errno.EFBIG, deltabox.ResourceExhausted), (errno.EMFILE, deltabox.ResourceExhausted),
    (errno.EISDIR, deltabox.InvalidArgument), (errno.EINVAL, deltabox.InvalidArgument),
    (errno.ELOOP, deltabox.InvalidArgument), (errno.ENAMETOOLONG, deltabox.InvalidArgument),
    (errno.ENOEXEC, deltabox.InvalidArgument), (errno.E2BIG, deltabox.InvalidArgument),
    (errno.ENOTEMPTY, deltabox.FailedPrecondition), (errno.EBUSY, deltabox.FailedPrecondition),
    (errno.ETXTBSY, deltabox.FailedPrecondition),
]


@pytest.mark.parametrize("err, cls", TABLE, ids=[errno.errorcode[e] for e, _ in TABLE])
def test_error_from_errno(err, cls):
    e = error_from_errno(err, "/tmp/x: why")
    assert type(e) is cls and e.message == "/tmp/x: why"
    assert e.code == cls.code


def test_not_a_path_and_unmapped():
    assert type(error_from_errno(errno.ENOENT, "x", path=False)) is deltabox.NotFound
    assert error_from_errno(errno.EIO, "x") is None  # the caller reports INTERNAL
    assert error_from_errno(0, "x") is None


def test_the_init_protocol_uses_the_same_mapping():
    """What disagreed before: EACCES was InvalidArgument, ENOMEM FailedPrecondition."""
    assert type(error_from_fail("errno=13 execve /x: Permission denied")) \
        is deltabox.PermissionDenied
    limit = error_from_fail("errno=12 fork: Cannot allocate memory")
    assert type(limit) is deltabox.ResourceExhausted and "limit" in limit.message
    assert type(error_from_fail("errno=11 fork: Resource temporarily unavailable")) \
        is deltabox.ResourceExhausted
    assert type(error_from_fail("errno=2 execve /nosuch: No such file or directory")) \
        is deltabox.PathNotFound
    assert type(error_from_fail("errno=2 attach s1: no such session")) \
        is deltabox.SessionNotFound
    assert type(error_from_fail("errno=2 query p1: no such process")) \
        is deltabox.ProcessNotFound
    # the init refusing a request of ours is our bug, whatever its errno
    assert type(error_from_fail("errno=22 query: malformed record")) is deltabox.Internal
    assert type(error_from_fail("errno=71 protocol: bad frame")) is deltabox.Internal


def test_through_the_daemon(tiny):
    tiny.write_file("/tmp/not-exec", "#!/bin/sh\necho hi\n", mode=0o644)
    with pytest.raises(deltabox.PermissionDenied):          # execve: EACCES
        tiny.exec(["/tmp/not-exec"])
    with pytest.raises(deltabox.PathNotFound):              # execve: ENOENT
        tiny.exec(["/no/such/binary"])
    with pytest.raises(deltabox.PathNotFound):              # openat2: ENOENT
        tiny.read_file("/no/such/file")
    tiny.mkdir("/tmp/full")
    tiny.write_file("/tmp/full/f", "x")
    with pytest.raises(deltabox.FailedPrecondition, match="recursive"):  # ENOTEMPTY
        tiny.remove("/tmp/full")
