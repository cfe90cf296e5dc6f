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
    "error_for_code",
]


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


_BY_CODE = {cls.code: cls for cls in DeltaboxError.__subclasses__()}


def error_for_code(code_name: str, message: str) -> DeltaboxError:
    """The exception class for a gRPC status code name (``DeltaboxError`` if unknown)."""
    cls = _BY_CODE.get(code_name)
    if cls is None:
        err = DeltaboxError(message)
        err.code = code_name
        return err
    return cls(message)
