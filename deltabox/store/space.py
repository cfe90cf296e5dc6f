"""The store's free space, and the reserve that new work may not eat into.

Every sandbox's upper, every checkpoint layer, CRIU images and the metadata
database share one XFS filesystem. Per-sandbox disk limits (`deltabox.host.quota`)
keep one sandbox from taking it all where the kernel enforces them; the reserve
is the daemon's own line: below it, new work (create, checkpoint, fork, import)
is refused with RESOURCE_EXHAUSTED *before* the store is full, so the database,
work already in flight and the deletions that free space still have room.

A reserve is given as a size ("1G", "512M", "0") or a percentage of the store
("5%"); the inode reserve as a count or a percentage of the store's inodes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from deltabox.errors import ResourceExhausted
from deltabox.units import human_bytes

__all__ = ["StoreSpace", "SpaceUsage", "parse_reserve", "DEFAULT_RESERVE",
           "DEFAULT_RESERVE_INODES"]

# Unset --store-reserve: 5% of the store, but never more than 4 GiB (a big host XFS
# would otherwise keep tens of GiB idle).
DEFAULT_RESERVE = "5%"
DEFAULT_RESERVE_CAP = 4 << 30
DEFAULT_RESERVE_INODES = "1%"

_RESERVE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(%|[KMGT]?)(?:i?B)?", re.I)


def parse_reserve(text: str, unit_suffixes: bool = True) -> tuple[float, bool]:
    """(value, is_fraction) for "5%" (0.05, True), "1G" (2**30, False), "0" (0, False).
    Raises ValueError (a configuration error: the caller exits with it)."""
    m = _RESERVE_RE.fullmatch(str(text).strip())
    if not m or (m.group(2) not in ("", "%") and not unit_suffixes):
        raise ValueError(f"invalid reserve {text!r}: give a size (e.g. 1G, 512M, 0) or a "
                         "percentage of the store (e.g. 5%)" if unit_suffixes else
                         f"invalid inode reserve {text!r}: give a count (e.g. 10000) or a "
                         "percentage of the store's inodes (e.g. 1%)")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        if value >= 100:
            raise ValueError(f"invalid reserve {text!r}: a percentage must be below 100")
        return value / 100, True
    return value * 1024 ** " KMGT".index(unit or " "), False


@dataclass(frozen=True)
class SpaceUsage:
    size_bytes: int
    free_bytes: int       # what unprivileged-or-not writers can still allocate (f_bavail)
    inodes: int
    free_inodes: int
    reserve_bytes: int
    reserve_inodes: int

    @property
    def below_reserve(self) -> bool:
        return self.free_bytes < self.reserve_bytes or self.free_inodes < self.reserve_inodes

    def describe(self) -> str:
        return (f"{human_bytes(self.free_bytes)} free of {human_bytes(self.size_bytes)}, "
                f"{self.free_inodes:,} of {self.inodes:,} inodes free")


class StoreSpace:
    """statvfs of the store root, against the configured reserve."""

    def __init__(self, root: Path, reserve: str | None = None,
                 reserve_inodes: str | None = None):
        self.root = root
        self._reserve = parse_reserve(reserve if reserve is not None else DEFAULT_RESERVE)
        self._default_cap = reserve is None
        self._reserve_inodes = parse_reserve(
            reserve_inodes if reserve_inodes is not None else DEFAULT_RESERVE_INODES,
            unit_suffixes=False)

    def usage(self) -> SpaceUsage:
        st = os.statvfs(self.root)
        size, inodes = st.f_blocks * st.f_frsize, st.f_files
        value, fraction = self._reserve
        reserve = value * size if fraction else value
        if self._default_cap:
            reserve = min(reserve, DEFAULT_RESERVE_CAP)
        ivalue, ifraction = self._reserve_inodes
        return SpaceUsage(size, st.f_bavail * st.f_frsize, inodes, st.f_favail,
                          int(reserve), int(ivalue * inodes if ifraction else ivalue))

    def require(self, what: str) -> None:
        """Refuse `what` (new work) while the store's free space is below the reserve."""
        u = self.usage()
        if u.below_reserve:
            raise ResourceExhausted(
                f"{what} refused: the store is nearly full ({u.describe()}), below its "
                f"reserve of {human_bytes(u.reserve_bytes)} and {u.reserve_inodes:,} inodes "
                "kept for the metadata database and work in flight. Free space (destroy "
                "sandboxes, delete checkpoints, remove images) or lower the daemon's "
                "--store-reserve")

    def full_message(self, what: str) -> str:
        """The message of an operation that failed with ENOSPC in the store."""
        try:
            state = self.usage().describe()
        except OSError:
            state = "its free space is unknown"
        return (f"{what} failed: no space left in the store ({state}); or the sandbox is "
                "at its disk limit. Free space (destroy sandboxes, delete checkpoints, "
                "remove images) and retry")
