"""The daemon's configuration: every setting, its default, and where its value comes from.

`SETTINGS` names each setting once: its key in `/etc/deltabox/config.toml`, which is also its
long flag (`deltabox daemon --KEY`), the `Config` field it sets, its type and its help. The
parser of the flags (`deltabox.server.config_args`) and the reader of the file are both
built from it, so a setting cannot exist in one and not the other.

Where a value comes from, each source overriding the ones before it:

    the defaults of `Config`  <  environment variables (`ENV_VARS`)  <  the file  <  flags

The environment is read once, by `resolve`, when the daemon starts: importing this module
reads nothing. This module uses the standard library only (the CLI imports it to build its
parser, and a client-only install has no server dependencies).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from deltabox.units import parse_size

__all__ = ["Config", "ConfigError", "Setting", "SETTINGS", "ENV_VARS", "DEFAULT_CONFIG_FILE",
           "DEFAULT_SOCKET", "DEFAULT_STATE_DIR", "DEFAULT_CRIU_PREFIX", "DEFAULT_IMAGE_DIR",
           "init_binary", "parse_size", "read_config_file", "from_environment", "resolve"]

DEFAULT_CONFIG_FILE = Path("/etc/deltabox/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/deltabox")
DEFAULT_SOCKET = Path("/run/deltabox/deltabox.sock")
DEFAULT_CRIU_PREFIX = Path("/opt/deltabox/criu")
DEFAULT_CACHE = Path("/var/cache/deltabox")
# Where native/setup-host.sh puts the tiny and demo images.
DEFAULT_IMAGE_DIR = DEFAULT_CACHE / "images"
MiB = 1 << 20
TOKEN_ENV = "DELTABOX_TOKEN"  # the TCP bearer token, when no token-file is given


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range; the message names it."""


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
    hot_checkpoints: int = 8             # per sandbox: the last K checkpoints keep a double
    hottest_pool: int = 2                # incarnations kept of the hottest (head) checkpoint
    double_policy: str = "adaptive"      # when a full checkpoint gets a body double
    max_chain_depth: int = 32            # squash checkpoint chains deeper than this
    max_fork: int = 256
    warm_budget_bytes: int = 4 << 30    # memory for body doubles + warm fork pools (LRU)
    restore_parallelism: int = 2         # CRIU restores at once (each is CPU-bound)
    # Threads for the daemon's blocking work (CRIU RPCs, freezes, sinks, the store): mostly
    # waiting on CRIU and the kernel, so many; 0 = auto (server.app.blocking_threads).
    blocking_threads: int = 0
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
    criu_prefix: Path = DEFAULT_CRIU_PREFIX  # CRIU as built by native/setup-host.sh
    log_level: str = "info"
    metrics_address: str | None = None   # host:port of an HTTP /metrics for Prometheus; off
    on_exit: str = "stop"                # on SIGTERM: stop | keep | systemd (deltabox.host.systemd)
    ksm: str = "off"                     # merge identical pages of sandboxes: off | on | auto
    ksm_pages_to_scan: int = 1000        # ksmd's rate set by ksm = on (if still the default)
    # The key that signs exported checkpoints and must sign an imported FULL one (its CRIU
    # images are restored as host root): transfer-key-file's bytes (deltabox.core.transfer_key).
    transfer_key: bytes | None = field(default=None, repr=False)
    transfer_require_signature: bool = False  # also refuse unsigned FS checkpoint imports


# ---- value types -------------------------------------------------------------------------

def _type_error(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _type_error(key, "a non-empty string", value)
    return value


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, "an integer", value)
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0, not {value}")
    return value


def _as_size(key: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, 'a size (a number of bytes, or a string such as "4G")', value)
    return _as_int(key, value)


def _as_size_text(key: str, value: Any) -> str:
    _as_size(key, value)  # a valid size, kept as written (the store parses it)
    return str(value)


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, "true or false", value)
    return value


def _as_path(key: str, value: Any) -> Path:
    return Path(_as_str(key, value))


def _as_paths(key: str, value: Any) -> tuple[Path, ...]:
    if not isinstance(value, list) or not value:
        raise _type_error(key, "a non-empty list of paths", value)
    return tuple(_as_path(key, v).resolve() for v in value)


def _as_reserve(key: str, value: Any) -> str:
    """A store reserve: a size or a percentage ("store-reserve"), a count or a percentage
    ("store-reserve-inodes"); checked by the store's own parser."""
    from deltabox.store.space import parse_reserve
    try:
        parse_reserve(_as_str(key, value),
                      unit_suffixes=key.lstrip("-") == "store-reserve")  # a key or a flag
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return value


def _as_level(key: str, value: Any) -> str:
    level = _as_str(key, value).lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"{key}: {value!r} is not one of debug, info, warning, error, "
                          "critical")
    return level


def _as_on_exit(key: str, value: Any) -> str:
    if value not in ("stop", "keep", "systemd"):
        raise ConfigError(f"{key}: {value!r} is not one of stop, keep, systemd")
    return value


def _as_double_policy(key: str, value: Any) -> str:
    if value not in ("always", "adaptive", "never"):
        raise ConfigError(f"{key}: {value!r} is not one of always, adaptive, never")
    return value


def _as_ksm(key: str, value: Any) -> str:
    if value not in ("off", "on", "auto"):
        raise ConfigError(f"{key}: {value!r} is not one of off, on, auto")
    return value


def _as_address(key: str, value: Any) -> str:
    host, sep, port = _as_str(key, value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free one
        raise ConfigError(f"{key}: expected HOST:PORT, not {value!r}")
    return value


def _as_token_file(key: str, value: Any) -> str:
    """The token read from the file named (a chmod-600 file; see deltabox.client)."""
    from deltabox.client import read_token_file
    from deltabox.errors import InvalidArgument
    try:
        return read_token_file(_as_str(key, value))
    except (OSError, ValueError, InvalidArgument) as e:
        raise ConfigError(f"{key}: {e}") from None


def _as_key_file(key: str, value: Any) -> bytes:
    """The transfer key read from the file named (root-only, no symlink, >= 32 bytes)."""
    from deltabox.core.transfer_key import KeyFileError, read_key_file
    try:
        return read_key_file(_as_str(key, value))
    except KeyFileError as e:
        raise ConfigError(f"{key}: {e}") from None


# ---- the settings --------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    key: str                 # TOML key and long flag
    field: str               # Config attribute
    convert: Any             # (key, TOML-typed value) -> the field's value, or ConfigError
    help: str
    metavar: str | None = None
    flag_type: Any = str     # how a flag's text becomes the TOML-typed value

    @property
    def is_bool(self) -> bool:
        return self.convert is _as_bool

    @property
    def is_list(self) -> bool:
        return self.convert is _as_paths


SETTINGS: tuple[Setting, ...] = (
    Setting("state-dir", "state_dir", _as_path, "where layers, branches and the database "
            "live (root only)", "DIR"),
    Setting("socket", "socket", _as_path, "the unix socket to listen on", "PATH"),
    Setting("socket-group", "socket_group", _as_str, "group that may use the unix socket "
            "(0660; its directory becomes root:GROUP 0750); default root", "NAME|GID"),
    Setting("store-size", "store_size", _as_size_text, "size of the loop-backed XFS image, "
            "when the state dir is not on XFS", "SIZE"),
    Setting("durable", "durable", _as_bool, "fsync every commit and layer (survives power "
            "loss; slower)"),
    Setting("standby", "standby", _as_bool, "keep a ready incarnation for fast rollback"),
    Setting("warm-budget", "warm_budget_bytes", _as_size, "memory for body doubles and warm "
            "fork pools", "SIZE"),
    Setting("restore-parallelism", "restore_parallelism", _as_int, "CRIU restores run at "
            "once (each is CPU-bound: about the number of cores)", "N", int),
    Setting("blocking-threads", "blocking_threads", _as_int, "threads for the daemon's "
            "blocking work (CRIU dumps, freezes, file sinks, the store); each full checkpoint "
            "holds one while it dumps, so fewer threads than concurrent checkpoints queue "
            "them; 0 = auto (8 per CPU, at least 64)", "N", int),
    Setting("default-memory", "default_memory_bytes", _as_size, "memory limit of a sandbox "
            "when create gives none", "SIZE"),
    Setting("default-pids", "default_pids", _as_int, "process limit of a sandbox when create "
            "gives none", "N", int),
    Setting("default-disk", "default_disk_bytes", _as_size, "disk limit of a sandbox when "
            "create gives none (0 = none; an XFS project quota: see `deltabox status`)",
            "SIZE"),
    Setting("max-output", "max_output_bytes", _as_size, "output kept per exec stream when "
            "the request gives no limit", "SIZE"),
    Setting("max-file-read", "max_file_read_bytes", _as_size, "largest ReadFile reply",
            "SIZE"),
    Setting("max-message", "max_message_bytes", _as_size, "gRPC message limit (file writes, "
            "stdin)", "SIZE"),
    Setting("max-chain-depth", "max_chain_depth", _as_int, "squash checkpoint chains deeper "
            "than this", "N", int),
    Setting("max-fork", "max_fork", _as_int, "most children one Fork or Warm may ask for",
            "N", int),
    Setting("store-reserve", "store_reserve", _as_reserve, "refuse new sandboxes, checkpoints, "
            "forks and imports while the store has less free space than this, e.g. 1G or 5%% "
            "(default: 5%%, at most 4G; 0 = never)", "SIZE|PCT"),
    Setting("store-reserve-inodes", "store_reserve_inodes", _as_reserve, "the same for the "
            "store's free inodes (default: 1%%)", "N|PCT"),
    Setting("image-dir", "image_dirs", _as_paths, "a directory image imports may read from "
            "(repeatable; writable by root only)", "DIR"),
    Setting("max-image-bytes", "max_image_bytes", _as_size, "refuse an image import that "
            "writes more file data", "SIZE"),
    Setting("max-image-entries", "max_image_entries", _as_int, "refuse an image import that "
            "creates more entries, i.e. inodes", "N", int),
    Setting("tcp", "tcp_address", _as_address, "also listen on HOST:PORT (needs tls-cert, "
            "tls-key and token-file or $DELTABOX_TOKEN)", "HOST:PORT"),
    Setting("tls-cert", "tls_cert", _as_path, "the TCP listener's certificate (PEM)", "PATH"),
    Setting("tls-key", "tls_key", _as_path, "the TCP listener's private key (PEM)", "PATH"),
    Setting("token-file", "token", _as_token_file, "bearer token for TCP clients, in a "
            "chmod-600 file (or $DELTABOX_TOKEN)", "PATH"),
    Setting("metrics-address", "metrics_address", _as_address, "serve Prometheus metrics "
            "over HTTP at HOST:PORT/metrics (off by default; no TLS, no token: keep it on "
            "127.0.0.1 or a private network)", "HOST:PORT"),
    Setting("criu-prefix", "criu_prefix", _as_path, "where CRIU is installed "
            "(PREFIX/sbin/criu)", "DIR"),
    Setting("log-level", "log_level", _as_level, "debug, info, warning or error", "LEVEL"),
    Setting("on-exit", "on_exit", _as_on_exit, "on SIGTERM: stop the sandboxes, keep them "
            "running for the next daemon to adopt, or 'systemd': keep them when systemd "
            "restarts the unit, stop them otherwise", "stop|keep|systemd"),
    Setting("hot-checkpoints", "hot_checkpoints", _as_int, "per sandbox, how many of the "
            "checkpoints it made or rolled back to last keep a ready body double / standby "
            "(within the warm budget)", "K", int),
    Setting("hottest-pool", "hottest_pool", _as_int, "how many ready incarnations the "
            "hottest checkpoint (just made or rolled back to) keeps, for back-to-back "
            "rollbacks to it", "N", int),
    Setting("double-policy", "double_policy", _as_double_policy, "when a full checkpoint "
            "gets a body double: always (every hot one), adaptive (when the sandbox's "
            "rollback rate says it will likely be used), never (only when a checkpoint "
            "call asks for one); see docs/deltacr.md", "always|adaptive|never"),
    Setting("ksm", "ksm", _as_ksm, "merge identical memory pages of sandboxes and their "
            "body doubles with the kernel's KSM: 'on' turns ksmd on for the whole host; "
            "'auto' merges only if the host already runs it; merging crosses sandboxes "
            "(docs/security.md)", "off|on|auto"),
    Setting("ksm-pages-to-scan", "ksm_pages_to_scan", _as_int, "with ksm = on: ksmd's pages "
            "per 20 ms, set host-wide if still the kernel's default 100 (0 = leave it)",
            "N", int),
    Setting("transfer-key-file", "transfer_key", _as_key_file, "a root-only file of at "
            "least 32 random bytes shared by the daemons that trust each other: exports are "
            "signed with it, and a FULL checkpoint is imported only if signed with it "
            "(docs/security.md, \"Importing checkpoints\")", "PATH"),
    Setting("transfer-require-signature", "transfer_require_signature", _as_bool, "refuse "
            "unsigned imports of FS checkpoints too (FULL ones always need a signature)"),
)
_BY_KEY = {s.key: s for s in SETTINGS}

# Environment variables the daemon honours, read once at start-up (`from_environment`):
# the variable, the setting it gives a value to, and how its text becomes that value.
ENV_VARS: dict[str, tuple[str, Any]] = {
    "DELTABOX_STATE_DIR": ("state-dir", str),
    "DELTABOX_SOCKET": ("socket", str),
    "DELTABOX_CRIU_PREFIX": ("criu-prefix", str),
    "DELTABOX_CACHE": ("image-dir", lambda v: [str(Path(v) / "images")]),
    "DELTABOX_LOG_LEVEL": ("log-level", str),
    "DELTABOX_TRANSFER_KEY_FILE": ("transfer-key-file", str),
}


def _setting(key: str, where: str) -> Setting:
    try:
        return _BY_KEY[key]
    except KeyError:
        hint = " (the token itself never goes in a file or a flag: use token-file)" \
            if key == "token" else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}; the keys are: "
                          f"{', '.join(sorted(_BY_KEY))}") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """{Config field: value} of the TOML file at `path`. An unknown key, a wrong type or a
    bad value raises `ConfigError` naming the file and the key."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    values = {}
    for key, value in table.items():
        setting = _setting(key, str(path))
        try:
            values[setting.field] = setting.convert(key, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return values


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """{Config field: value} of the `ENV_VARS` set in `environ`."""
    values = {}
    for var, (key, to_toml) in ENV_VARS.items():
        if environ.get(var):
            setting = _BY_KEY[key]
            try:
                values[setting.field] = setting.convert(key, to_toml(environ[var]))
            except ConfigError as e:
                raise ConfigError(f"${var}: {e}") from None
    return values


def resolve(file_values: Mapping[str, Any], flag_values: Mapping[str, Any],
            environ: Mapping[str, str]) -> Config:
    """The Config of defaults < `environ` < the file's values < the flags' values (each
    {Config field: value}, as `read_config_file` and the flag parser give them)."""
    merged = {**from_environment(environ), **file_values, **flag_values}
    if "token" not in merged and environ.get(TOKEN_ENV):
        from deltabox.client import load_token  # it checks the token's form
        from deltabox.errors import InvalidArgument
        try:
            merged["token"] = load_token(None)
        except InvalidArgument as e:
            raise ConfigError(str(e)) from None
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in merged.items() if k in known})
