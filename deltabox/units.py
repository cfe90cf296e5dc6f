"""Sizes as people write them ("512M", "1.5G") and read them ("1.5 GiB"): binary units.

One home for the parsing and printing that the daemon's configuration, the store and the
image importer share, so that a size the configuration accepts is one the store accepts.
Pure functions, no dependencies: the client may import it too.
"""

from __future__ import annotations

import re

__all__ = ["parse_size", "human_bytes"]

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.I)


def parse_size(text: str) -> int:
    """Bytes of a size such as "512M", "4G", "1.5T" or "0" (binary units)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r} (e.g. 512M, 2G)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def human_bytes(n: int) -> str:
    """"512 B", "1.5 KiB", ... "12.0 GiB" (GiB is the largest unit)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
