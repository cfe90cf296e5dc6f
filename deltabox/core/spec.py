"""A sandbox's spec: the limits and settings it is created with, checked.

`create` builds a spec from a call's fields (`check_limits`); a checkpoint brought in from
another host (ImportCheckpoint) carries the spec of the sandbox it was taken from, which a
fork of it is created with: that one is checked as a whole (`check_spec`), since the stream
may have been written by anyone.
"""

from __future__ import annotations

import math
import os

from deltabox.core.process import check_env
from deltabox.errors import InvalidArgument
from deltabox.store.records import validate_name
from deltabox.types import NetworkMode

__all__ = ["check_limits", "check_network", "check_spec"]

# Limits the kernel takes (pids.max: at most PID_MAX_LIMIT; a CFS quota: at least 1 ms
# per 100 ms period) and that leave a sandbox able to start (its init and a process).
MIN_MEMORY_BYTES = 16 << 20
MIN_PIDS, MAX_PIDS = 4, 1 << 22
MIN_CPUS = 0.01
MIN_DISK_BYTES, MIN_DISK_INODES = 16 << 20, 1024  # the init's copy of itself lives there


def check_limits(memory_bytes: int, pids: int, cpus: float, disk_bytes: int,
                  disk_inodes: int) -> None:
    """Refuse limits the kernel would reject (or that leave no sandbox), naming the field
    and its bounds; 0 means the default everywhere."""
    ncpu = os.cpu_count() or 1
    if not (math.isfinite(cpus) and (cpus == 0 or MIN_CPUS <= cpus <= ncpu)):
        raise InvalidArgument(f"cpus limit must be between {MIN_CPUS} and {ncpu} (the host's "
                              f"CPUs), or 0 for no quota; not {cpus}")
    for name, value, low, high, unit in (
            ("memory", memory_bytes, MIN_MEMORY_BYTES, None, "16 MiB"),
            ("pids", pids, MIN_PIDS, MAX_PIDS, str(MIN_PIDS)),
            ("disk", disk_bytes, MIN_DISK_BYTES, None, "16 MiB"),
            ("disk_inodes", disk_inodes, MIN_DISK_INODES, None, str(MIN_DISK_INODES))):
        if value != 0 and (value < low or high is not None and value > high):
            bounds = f"between {unit} and {high:,}" if high else f"at least {unit}"
            raise InvalidArgument(f"{name} limit must be {bounds} (0 = the daemon's "
                                  f"default), not {value:,}")


def check_network(network: str) -> None:
    if network not in (NetworkMode.NONE, NetworkMode.NAT):
        raise InvalidArgument(f"network must be 'none' or 'nat', not {network[:40]!r}")


def check_spec(spec: dict, where: str) -> dict:
    """The spec of an imported checkpoint, as `create` would have made it: each field of
    its type and within its limits; memory and pids present and positive (the source
    daemon stored its defaults), the disk limits optional (specs from before them have
    none: no quota, as for such a sandbox here). Returns only the fields a spec has (a
    NAT sandbox's address is allocated again by the fork that uses it)."""
    def field(key: str, kind, default=None):
        value = spec.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidArgument(f"{where}: its spec's {key!r} is missing or not "
                                  f"{'a number' if kind is not str else 'a string'}")
        return value
    out = {k: field(k, int) for k in ("memory_bytes", "pids")}
    out.update({k: field(k, int, 0) for k in ("disk_bytes", "disk_inodes")})
    # A CPU quota from a host with more cores than this one is this host's cores.
    out["cpus"] = min(float(field("cpus", (int, float))), float(os.cpu_count() or 1))
    out["network"], hostname = field("network", str), field("hostname", str)
    for k in ("memory_bytes", "pids"):
        if out[k] <= 0:
            raise InvalidArgument(f"{where}: its spec's {k!r} must be positive, not {out[k]}")
    for k in ("disk_bytes", "disk_inodes"):
        if out[k] < 0:
            raise InvalidArgument(f"{where}: its spec's {k!r} must be >= 0, not {out[k]}")
    try:
        check_limits(out["memory_bytes"], out["pids"], out["cpus"], out["disk_bytes"],
                     out["disk_inodes"])
        out["hostname"] = validate_name(hostname, "host")
        env = spec.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise InvalidArgument("its environment must map names to strings")
        check_env(env)
        check_network(out["network"])
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from None
    out["env"] = dict(env)
    return out
