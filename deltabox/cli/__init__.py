"""The `deltabox` command line (`python -m deltabox.cli`, the `deltabox` script).

    main.py         the arguments and `main`
    sandboxes.py    images, sandboxes, exec, detached processes, sessions, shell, status
    checkpoints.py  snapshot, restore, fork, warm, tree, diff, checkpoint rm/pin
    output.py       tables, JSON (--json), size and NAME=VALUE parsing

The daemon's own subcommand (`deltabox daemon`) is built by deltabox.server.config_args.
"""

from deltabox.cli.main import build_parser, main

__all__ = ["main", "build_parser"]
