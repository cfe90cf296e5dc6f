"""DeltaBox's exceptions: one class per failure kind, shared by daemon and client.

Each class names the gRPC status code it travels as. The daemon maps a raised
``DeltaboxError`` to that code in one interceptor; the client maps the code
back to the same class, so a caller sees the same exception locally and
remotely.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "DeltaboxError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "ResourceExhausted",
    "PermissionDenied",
    "Unimplemented",
    "Unavailable",
    "DeadlineExceeded",
    "Internal",
    "SandboxNotFound",
    "CheckpointNotFound",
    "ImageNotFound",
    "SessionNotFound",
    "ProcessNotFound",
    "PathNotFound",
    "error_for_code",
    "error_from_errno",
    "ERROR_METADATA_KEY",
]

# The trailing-metadata key under which the daemon names a domain error's class
# (``SandboxNotFound``), so the client raises the very class the daemon raised.
ERROR_METADATA_KEY = "deltabox-error"


class DeltaboxError(Exception):
    """Base class. ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(DeltaboxError):
    code = "INVALID_ARGUMENT"


class NotFound(DeltaboxError):
    code = "NOT_FOUND"


class AlreadyExists(DeltaboxError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(DeltaboxError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(DeltaboxError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(DeltaboxError):
    code = "PERMISSION_DENIED"


class Unimplemented(DeltaboxError):
    code = "UNIMPLEMENTED"


class Unavailable(DeltaboxError):
    code = "UNAVAILABLE"


class DeadlineExceeded(DeltaboxError):
    code = "DEADLINE_EXCEEDED"


class Internal(DeltaboxError):
    code = "INTERNAL"


# Domain errors: what is missing, not only that something is. Each subclasses the class of
# its gRPC code, so ``except NotFound`` still catches them all.

class SandboxNotFound(NotFound):
    """No sandbox of that name or id."""


class CheckpointNotFound(NotFound):
    """No checkpoint of that id (never taken, or deleted)."""


class ImageNotFound(NotFound):
    """No image of that name, or no image source at that path."""


class SessionNotFound(NotFound):
    """No session of that name in the sandbox."""


class ProcessNotFound(NotFound):
    """No detached process of that id in the sandbox."""


class PathNotFound(NotFound):
    """No file or directory at that path inside the sandbox."""


_BY_CODE = {cls.code: cls for cls in DeltaboxError.__subclasses__()}
_DOMAIN = {cls.__name__: cls for base in DeltaboxError.__subclasses__()
           for cls in base.__subclasses__()}


def error_for_code(code_name: str, message: str, domain: str = "") -> DeltaboxError:
    """The exception for a gRPC status code name and, when the daemon named one, its domain
    class (``domain``, the class name sent under ERROR_METADATA_KEY). An unknown domain name
    (a newer daemon) falls back to the code's class; an unknown code to ``DeltaboxError``."""
    cls = _DOMAIN.get(domain)
    if cls is not None and cls.code == code_name:
        return cls(message)
    cls = _BY_CODE.get(code_name)
    if cls is None:
        err = DeltaboxError(message)
        err.code = code_name
        return err
    return cls(message)


def domain_name(exc: BaseException) -> str:
    """The name the daemon sends for `exc` under ERROR_METADATA_KEY ("" = none)."""
    name = type(exc).__name__
    return name if _DOMAIN.get(name) is type(exc) else ""


# errno -> error class, for errors of work done on a sandbox's behalf (its files, its execs).
# ENOENT/ENOTDIR are in error_from_errno itself: they name a path only where the caller says.
_ERRNO_CLASS = {
    _errno.EEXIST: AlreadyExists,
    _errno.EACCES: PermissionDenied, _errno.EPERM: PermissionDenied,
    _errno.EXDEV: PermissionDenied, _errno.EROFS: PermissionDenied,
    _errno.ENOMEM: ResourceExhausted, _errno.EAGAIN: ResourceExhausted,
    _errno.ENOSPC: ResourceExhausted, _errno.EDQUOT: ResourceExhausted,
    _errno.EFBIG: ResourceExhausted, _errno.EMFILE: ResourceExhausted,
    _errno.ENFILE: ResourceExhausted,
    _errno.EISDIR: InvalidArgument, _errno.EINVAL: InvalidArgument,
    _errno.ELOOP: InvalidArgument, _errno.ENAMETOOLONG: InvalidArgument,
    _errno.ENOEXEC: InvalidArgument, _errno.E2BIG: InvalidArgument,
    _errno.ENXIO: InvalidArgument,
    _errno.ENOTEMPTY: FailedPrecondition, _errno.EBUSY: FailedPrecondition,
    _errno.ETXTBSY: FailedPrecondition,
}


def error_from_errno(err: int, text: str, *, path: bool = True) -> DeltaboxError | None:
    """The error for a failed system call made on a sandbox's behalf; ``text`` becomes its
    message (name the path or step, never a host path). The one errno mapping of DeltaBox:

    ==========================================  =====================================
    ENOENT, ENOTDIR                             PathNotFound (NotFound if not ``path``)
    EEXIST                                      AlreadyExists
    EACCES, EPERM, EXDEV, EROFS                 PermissionDenied
    ENOMEM, EAGAIN, ENOSPC, EDQUOT, EFBIG,      ResourceExhausted (a limit of the
    EMFILE, ENFILE                              sandbox or of the host was hit)
    EISDIR, EINVAL, ELOOP, ENAMETOOLONG,        InvalidArgument (the request cannot
    ENOEXEC, E2BIG, ENXIO                       work as asked)
    ENOTEMPTY, EBUSY, ETXTBSY                   FailedPrecondition (it may work later)
    anything else                               None: the caller's bug or the host's,
                                                reported as INTERNAL by the caller
    ==========================================  =====================================

    ``path``: the errno came from resolving a path inside the sandbox, so ENOENT means
    that path is missing (PathNotFound); False where the missing thing is something else.
    """
    if err in (_errno.ENOENT, _errno.ENOTDIR):
        return PathNotFound(text) if path else NotFound(text)
    cls = _ERRNO_CLASS.get(err)
    return cls(text) if cls is not None else None
