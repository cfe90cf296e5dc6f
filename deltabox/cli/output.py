"""How the CLI prints: a rich table or line for people, JSON with --json; and the little
parsers of its arguments (sizes, NAME=VALUE).

JSON is the client's result dataclasses as they are (`deltabox.client.results`): field
names as in the proto, enums as their words ("running", "full"), bytes decoded as UTF-8.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import re

__all__ = ["out", "table", "human", "parse_size", "parse_env", "to_json"]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 512M, 2G)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--env expects NAME=VALUE, got {item!r}")
        env[k] = v
    return env


def to_json(obj):
    """Plain JSON values for a result (a dataclass, a list of them, a dict ...)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(o) for o in obj]
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    return obj


def out(args, obj, render=None) -> None:
    """Print `obj` as JSON (--json) or via `render()` (a rich renderable or a string)."""
    if args.json:
        print(json.dumps(to_json(obj), indent=2, default=str))
    elif render is not None:
        from rich.console import Console
        Console().print(render())


def table(columns: list[str], rows: list[list]):
    from rich.table import Table
    t = Table(*columns, box=None, header_style="bold")
    for r in rows:
        t.add_row(*[str(c) for c in r])
    return t


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
