"""The vocabularies of DeltaBox: one enum per set of words that crosses a module boundary.

Each is a `StrEnum`, so a value *is* its word: it compares equal to the strings stored in the
state database and sent over the wire (``SandboxState.RUNNING == "running"``), and existing
records need no migration. This module imports nothing of DeltaBox: the client, the CLI and
the daemon all share it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SandboxState", "CheckpointMode", "RollbackPath", "NetworkMode", "SessionKind",
           "FileType", "DiffChange"]


class SandboxState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"  # processes ended (e.g. the init died); files kept
    BROKEN = "broken"  # clean-up failed half way; destroy retries it


class CheckpointMode(StrEnum):
    FS = "fs"  # DeltaFS only: files; processes restart
    FULL = "full"  # DeltaFS + DeltaCR: files and the process tree


class RollbackPath(StrEnum):
    """How a rollback reached its checkpoint (fastest first; docs/deltacr.md)."""
    DOUBLE = "double"  # a body double was ready: a record swap and a signal
    DOUBLE_WAITED = "double-waited"  # the double was still being built; waited for it
    STANDBY = "standby"  # fs checkpoint: a prepared branch with a fresh init was ready
    STANDBY_WAITED = "standby-waited"
    RESTORE = "restore"  # CRIU restore on the spot
    FRESH = "fresh"  # fs checkpoint: mount + a fresh init on the spot


class NetworkMode(StrEnum):
    NONE = "none"  # loopback only
    NAT = "nat"  # loopback + a veth pair with outbound NAT


class SessionKind(StrEnum):
    BASH = "bash"
    SH = "sh"
    PYTHON = "python"


class FileType(StrEnum):
    REGULAR = "regular"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


class DiffChange(StrEnum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"
