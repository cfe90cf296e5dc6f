"""`deltabox daemon`: its flags, and the Config they, the config file and the environment make.

The flags are generated from `deltabox.config.SETTINGS` (each setting's key is its long flag),
so every setting of the file has a flag and the other way round. `deltabox.cli` only adds the
subcommand (`add_daemon_parser`); this module imports nothing beyond the standard library
and `deltabox.config` until the daemon actually starts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deltabox.config import (DEFAULT_CONFIG_FILE, SETTINGS, TOKEN_ENV, Config, ConfigError,
                             read_config_file, resolve)

__all__ = ["add_daemon_parser", "config_from_args", "run_daemon_command"]


def _dest(field: str) -> str:
    # Apart from the top-level parser's own options (--socket, --token-file: the client's).
    return f"daemon_{field}"


def add_daemon_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `daemon` subcommand (every setting as a flag) to `subparsers`."""
    d = subparsers.add_parser("daemon", help="run the daemon (as root)",
                              description="Run the DeltaBox daemon. Every option can also be "
                              "set in the config file (keys are the long flags without "
                              "'--'); a flag given here wins over the file.")
    d.add_argument("--config", dest="daemon_config", metavar="PATH",
                   help=f"TOML file of these options (default {DEFAULT_CONFIG_FILE} when it "
                   "exists; 'none' reads no file)")
    defaults = Config()
    for s in SETTINGS:
        help = s.help + _default_text(getattr(defaults, s.field), s)
        if s.is_bool:
            d.add_argument(f"--{s.key}", dest=_dest(s.field), default=None,
                           action=argparse.BooleanOptionalAction, help=help)
        elif s.is_list:
            d.add_argument(f"--{s.key}", dest=_dest(s.field), default=None, action="append",
                           metavar=s.metavar, help=help)
        else:
            d.add_argument(f"--{s.key}", dest=_dest(s.field), default=None, type=s.flag_type,
                           metavar=s.metavar, help=help)
    # Refused (it would show in /proc/<pid>/cmdline); also keeps `--token` from being
    # taken as an abbreviation of --token-file.
    d.add_argument("--token", dest="daemon_token_refused", help=argparse.SUPPRESS)
    d.set_defaults(func=run_daemon_command, needs_client=False)
    return d


def _default_text(value, setting) -> str:
    if value is None or setting.key == "token-file" or "default" in setting.help:
        return ""
    if setting.convert.__name__ == "_as_size" and value:
        value = next(f"{value >> shift}{unit}" for shift, unit in
                     ((40, "T"), (30, "G"), (20, "M"), (10, "K"), (0, ""))
                     if value % (1 << shift) == 0)
    elif isinstance(value, tuple):
        value = " ".join(map(str, value))
    elif isinstance(value, bool):
        value = "yes" if value else "no"
    return f" (default {value})".replace("%", "%%")


def _flag_values(args: argparse.Namespace) -> dict:
    """{Config field: value} of the flags given on the command line."""
    values = {}
    for s in SETTINGS:
        raw = getattr(args, _dest(s.field), None)
        # `deltabox --socket X --token-file Y daemon`: the top-level options count too.
        if raw is None and s.key in ("socket", "token-file"):
            raw = getattr(args, s.key.replace("-", "_"), None)
        if raw is not None:
            values[s.field] = s.convert(f"--{s.key}", raw)
    return values


def _check(cfg: Config) -> None:
    """Refuse values that parse but cannot work, before the daemon touches anything."""
    from deltabox.core.image_layers import ImportLimits
    from deltabox.store.space import StoreSpace
    try:
        ImportLimits.from_config(cfg)  # refuse bad limits now, not at the first import
        StoreSpace(cfg.state_dir, cfg.store_reserve, cfg.store_reserve_inodes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.restore_parallelism < 1:
        raise ConfigError("restore-parallelism: must be at least 1")


def config_from_args(args: argparse.Namespace, environ=os.environ) -> Config:
    """The daemon's Config: defaults < environment < config file < flags. Raises
    ConfigError naming the setting that is wrong."""
    if getattr(args, "daemon_token_refused", None) is not None:
        raise ConfigError("--token is refused: any host user can read it in "
                          "/proc/<pid>/cmdline. Use --token-file PATH (a chmod-600 file) or "
                          f"${TOKEN_ENV}")
    path = args.daemon_config
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    file_values = read_config_file(path) if path not in (None, "none") else {}
    cfg = resolve(file_values, _flag_values(args), environ)
    _check(cfg)
    return cfg


# What the daemon needs beyond the client's grpcio + protobuf: the `server` extra.
SERVER_MODULES = ("grpc_health", "grpc_reflection", "pyroute2", "psutil", "structlog",
                  "prometheus_client", "_cffi_backend")


def require_server_install() -> None:
    """Refuse to start, saying what to install, when the `server` extra or the native parts
    (which `pip install` builds only where a C compiler and cffi are present) are missing."""
    import importlib.util

    import deltabox
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"deltabox daemon: {', '.join(missing)} missing: this is a client-only "
                         "install; install the daemon's dependencies with "
                         "`pip install 'deltabox[server]'`")
    package = Path(deltabox.__file__).parent
    absent = [name for name, present in (
        ("the cffi extension deltabox/_native*.so", importlib.util.find_spec("deltabox._native")),
        ("the sandbox init deltabox/_bin/deltabox-init",
         (package / "_bin" / "deltabox-init").exists())) if not present]
    if absent:
        raise SystemExit(f"deltabox daemon: {' and '.join(absent)} missing in {package}: they "
                         "are built at install time only where a C compiler, make and cffi "
                         "are present. Install those (`apt-get install build-essential`, "
                         "`pip install cffi`), then reinstall "
                         "(`pip install --force-reinstall --no-deps 'deltabox[server]'`), or "
                         "run `python native/build.py` in a checkout")


def run_daemon_command(args: argparse.Namespace) -> int:
    require_server_install()
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        raise SystemExit(f"deltabox daemon: {e}") from None
    os.environ.pop(TOKEN_ENV, None)  # sandboxes and helpers must not inherit it
    from deltabox.server.app import run_daemon
    run_daemon(cfg)
    return 0

