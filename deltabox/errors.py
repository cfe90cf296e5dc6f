"""DeltaBox's exceptions: one class per failure kind, shared by daemon and client.

Each class names the gRPC status code it travels as. The daemon maps a raised
``DeltaboxError`` to that code in one interceptor; the client maps the code
back to the same class, so a caller sees the same exception locally and
remotely.
"""

from __future__ import annotations

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
