"""The store's records: what `Store` hands out, and the SQLite rows they are kept in.

Records are plain dataclasses (a checkpoint, an image or a branch never changes once
committed; a sandbox record is the caller's copy of a row that moves). `Mount` is an
overlay mount described as data: the store returns it, callers perform it. Names that
users choose are checked here (`validate_name`); ids are made here (`new_id`).

The schema and the row -> record converters sit next to the records so that a column
and its field are read in one place. See `deltabox.store.metadata` for the vocabulary.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from deltabox.host import linux
from deltabox.errors import InvalidArgument

__all__ = ["Mount", "ImageRecord", "BranchRecord", "SandboxRecord", "CheckpointRecord",
           "validate_name", "new_id", "SCHEMA", "SCHEMA_VERSION", "CHECKPOINT_COLUMNS",
           "image_from_row", "sandbox_from_row", "checkpoint_from_row"]

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# What `new_id` makes: a name of this form could stand for another record's id (a lookup
# takes an id or a name: "destroy sbx-..." must never mean a sandbox that took that name).
ID_RE = re.compile(r"^(sbx|ck|br|l)-[0-9a-f]{12}$")


def validate_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(f"invalid {what} name {name!r}: use 1-63 characters "
                              "[a-z0-9_.-], starting with a letter or digit")
    if ID_RE.match(name):
        raise InvalidArgument(f"invalid {what} name {name!r}: it has the form of an id "
                              "(<sbx|ck|br|l>-<12 hex digits>), which names may not take")
    return name


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Mount:
    """An overlay mount described as data; `mount()` performs it."""
    target: str
    lowers: tuple[str, ...]   # bottom first
    upper: str | None
    work: str | None
    options: tuple[str, ...]

    def mount(self) -> None:
        linux.mount_overlay(self.target, list(self.lowers), self.upper, self.work,
                             self.options, readonly=self.upper is None)


@dataclass(frozen=True)
class ImageRecord:
    name: str
    layer_ids: tuple[str, ...]  # bottom first
    created_at: float
    source: str
    source_format: str
    size_bytes: int


@dataclass(frozen=True)
class BranchRecord:
    id: str
    lower: tuple[str, ...]  # layer ids, bottom first
    created_at: float


@dataclass
class SandboxRecord:
    id: str
    name: str
    image: str
    state: str  # creating | running | stopped | broken
    branch_id: str
    created_at: float
    spec: dict = field(default_factory=dict)  # limits, network, env, hostname
    init_pid: int = 0
    init_start: float = 0.0  # process start time: a pid alone may be reused
    head: str = ""  # the checkpoint the sandbox's state descends from ("" = the image)


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    sandbox_id: str         # the sandbox it was taken of
    parent_id: str          # "" for the first checkpoint of an image-based sandbox
    label: str
    mode: str               # "fs" or "full"
    created_at: float
    layers: tuple[str, ...]  # the chain as sunk, bottom first (older ids may be freed)
    mount: tuple[str, ...]   # an equal chain to mount (base + one squashed layer, once squashed)
    squashed: str           # the squashed layer in `mount`, once squashed
    pinned: bool
    stats: dict
    image: str
    spec: dict              # the sandbox's spec at checkpoint time (for fork)
    # FULL: why its processes cannot be restored ("" = not known to be broken), and
    # the CRIU build that found it (another build may restore it: see SandboxManager).
    unusable_reason: str = ""
    unusable_criu: str = ""

    @property
    def restorable(self) -> bool:
        return not self.unusable_reason

    @property
    def mount_layers(self) -> tuple[str, ...]:
        """What a branch over this checkpoint mounts (shorter once squashed)."""
        return self.mount



# ---- rows ----------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, size_bytes INTEGER NOT NULL,
    origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY, layer_ids TEXT NOT NULL, created_at REAL NOT NULL,
    source TEXT NOT NULL, source_format TEXT NOT NULL, size_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS branches (
    id TEXT PRIMARY KEY, lower TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, image TEXT NOT NULL,
    state TEXT NOT NULL, branch_id TEXT NOT NULL REFERENCES branches(id),
    created_at REAL NOT NULL, spec TEXT NOT NULL,
    init_pid INTEGER NOT NULL DEFAULT 0, init_start REAL NOT NULL DEFAULT 0,
    head TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, parent_id TEXT NOT NULL,
    label TEXT NOT NULL, mode TEXT NOT NULL, created_at REAL NOT NULL,
    layers TEXT NOT NULL, mount TEXT NOT NULL, squashed TEXT NOT NULL DEFAULT '',
    pinned INTEGER NOT NULL DEFAULT 0, stats TEXT NOT NULL DEFAULT '{}',
    image TEXT NOT NULL, spec TEXT NOT NULL,
    unusable TEXT NOT NULL DEFAULT '', unusable_criu TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS checkpoints_parent ON checkpoints(parent_id);
CREATE INDEX IF NOT EXISTS checkpoints_sandbox ON checkpoints(sandbox_id);
-- Content digests of layers (deltabox.store.transfers), computed at their first export or
-- recorded at import: added after schema version 1, created here on a store's next open.
CREATE TABLE IF NOT EXISTS layer_digests (
    layer_id TEXT PRIMARY KEY, digest TEXT NOT NULL, size_bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS layer_digests_digest ON layer_digests(digest);
"""


def image_from_row(r: tuple) -> ImageRecord:
    return ImageRecord(r[0], tuple(json.loads(r[1])), r[2], r[3], r[4], r[5])


def sandbox_from_row(r: tuple) -> SandboxRecord:
    return SandboxRecord(id=r[0], name=r[1], image=r[2], state=r[3], branch_id=r[4],
                         created_at=r[5], spec=json.loads(r[6]), init_pid=r[7], init_start=r[8],
                         head=r[9])


# Named, not `*`: columns added later (ALTER TABLE) sit in whatever order the store
# acquired them.
CHECKPOINT_COLUMNS = ("id, sandbox_id, parent_id, label, mode, created_at, layers, mount, "
                      "squashed, pinned, stats, image, spec, unusable, unusable_criu")


def checkpoint_from_row(r: tuple) -> CheckpointRecord:
    return CheckpointRecord(id=r[0], sandbox_id=r[1], parent_id=r[2], label=r[3], mode=r[4],
                            created_at=r[5], layers=tuple(json.loads(r[6])),
                            mount=tuple(json.loads(r[7])), squashed=r[8], pinned=bool(r[9]),
                            stats=json.loads(r[10]), image=r[11], spec=json.loads(r[12]),
                            unusable_reason=r[13], unusable_criu=r[14])

