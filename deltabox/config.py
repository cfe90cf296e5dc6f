"""Daemon configuration: paths and defaults, from flags or DELTABOX_* env vars."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Config", "DEFAULT_SOCKET", "DEFAULT_STATE_DIR", "CRIU_PREFIX", "init_binary"]

DEFAULT_STATE_DIR = Path(os.environ.get("DELTABOX_STATE_DIR", "/var/lib/deltabox"))
DEFAULT_SOCKET = Path(os.environ.get("DELTABOX_SOCKET", "/run/deltabox/deltabox.sock"))
CRIU_PREFIX = Path(os.environ.get("DELTABOX_CRIU_PREFIX", "/opt/deltabox/criu"))
# Where native/setup-host.sh puts the tiny and demo images.
DEFAULT_IMAGE_DIR = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox")) / "images"
MiB = 1 << 20


def init_binary() -> Path:
    """The static sandbox init built by native/build.py."""
    path = Path(__file__).resolve().parent / "_bin" / "deltabox-init"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: build it with `python native/build.py`")
    return path


@dataclass
class Config:
    state_dir: Path = DEFAULT_STATE_DIR
    socket: Path = DEFAULT_SOCKET
    store_size: str = "64G"              # sparse loop image, when not on XFS
    default_memory_bytes: int = 1024 * MiB
    default_pids: int = 1024
    default_disk_bytes: int = 10 << 30   # per sandbox, in the store (XFS project quota); 0 = none
    max_output_bytes: int = 16 * MiB     # per exec stream, when the request says 0
    max_file_read_bytes: int = 64 * MiB
    max_message_bytes: int = 80 * MiB    # gRPC message limit (file writes, stdin)
    tcp_address: str | None = None       # host:port, TLS only
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None             # bearer token required on TCP
    socket_group: str | None = None      # name or gid: owns the socket (0660) and its dir (0750)
    durable: bool = False                # fsync every commit (power-loss safe), slower
    standby: bool = True                 # keep a ready incarnation for fast rollback
    max_chain_depth: int = 32            # squash checkpoint chains deeper than this
    max_fork: int = 256
    warm_budget_bytes: int = 4 << 30    # memory for body doubles + warm fork pools (LRU)
    max_image_bytes: int = 64 << 30      # per image import: file data (all layers together)
    max_image_entries: int = 2_000_000   # per image import: entries, i.e. inodes (all layers)
    # ImportImage reads only below these (root-owned) directories: the daemon is root,
    # and a client (a socket-group member) must not make it read any host path.
    image_dirs: tuple[Path, ...] = (DEFAULT_IMAGE_DIR,)
    # Below this much free space in the store, new work (create, checkpoint, fork, import)
    # is refused (deltabox.store.space): a size ("1G") or a percentage ("5%"); None = 5%, at
    # most 4 GiB. Inodes: a count or a percentage of the store's; None = 1%.
    store_reserve: str | None = None
    store_reserve_inodes: str | None = None
    extra: dict = field(default_factory=dict)
