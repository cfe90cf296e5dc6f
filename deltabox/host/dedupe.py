"""Keeping full dumps small: share the page images a dump has in common with its parent's.

Without soft-dirty tracking (not in this kernel) every CRIU dump writes all pages again.
Most of them are the same as in the previous checkpoint, at the same offset of the same
pages-N.img (CRIU writes pages in VMA order). FIDEDUPERANGE asks XFS to share such ranges:
the kernel compares the bytes and shares the extents only if equal. Runs after the
checkpoint returned (deltabox.core.deltacr), never in the frozen window.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

__all__ = ["dedupe_pages"]

FIDEDUPERANGE = 0xC0189436
_DEDUPE_HDR = struct.Struct("=QQHHI")
_DEDUPE_INFO = struct.Struct("=qQQiI")
DEDUPE_CHUNK = 1 << 20


def _dedupe(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    buf = bytearray(_DEDUPE_HDR.pack(offset, length, 1, 0, 0)
                    + _DEDUPE_INFO.pack(dst_fd, offset, 0, 0, 0))
    fcntl.ioctl(src_fd, FIDEDUPERANGE, buf)
    _, _, deduped, status, _ = _DEDUPE_INFO.unpack_from(buf, _DEDUPE_HDR.size)
    return deduped if status == 0 else 0


def dedupe_pages(parent_dir: Path, new_dir: Path) -> int:
    """Share identical 1 MiB ranges of new_dir's page images (and ghost files: the
    same deleted file held open is copied again by every dump) with parent_dir's;
    returns the bytes now shared."""
    shared = 0
    for new in sorted([*new_dir.glob("pages-*.img"), *new_dir.glob("ghost-file-*.img")]):
        old = parent_dir / new.name
        if not old.exists():
            continue
        with open(old, "rb") as fo, open(new, "rb+") as fn:
            size = min(os.fstat(fo.fileno()).st_size, os.fstat(fn.fileno()).st_size)
            for off in range(0, size - size % 4096, DEDUPE_CHUNK):
                length = min(DEDUPE_CHUNK, size - off) // 4096 * 4096
                try:
                    shared += _dedupe(fo.fileno(), fn.fileno(), off, length)
                except OSError:
                    return shared  # not XFS/btrfs, or a range the kernel refuses
    return shared
