"""CLI commands about checkpoints: snapshot, restore, fork, warm, tree, diff,
checkpoint rm/pin/wait, and export/import (moving one to another daemon). Each `cmd_*` takes the parsed arguments and a `deltabox.Client`."""

from __future__ import annotations

import sys

from deltabox.cli.output import out
from deltabox.types import DiffChange

__all__ = ["cmd_snapshot", "cmd_restore", "cmd_fork", "cmd_warm", "cmd_tree", "cmd_diff",
           "cmd_checkpoint", "cmd_export", "cmd_import"]

_CHANGE_LETTER = {DiffChange.ADDED: "A", DiffChange.MODIFIED: "M", DiffChange.DELETED: "D"}


def _timings(t: dict) -> str:
    return ", ".join(f"{k.removesuffix('_ms')} {v:.2f} ms" for k, v in sorted(t.items()))


def cmd_snapshot(args, client) -> int:
    ck = client.get(args.sandbox).checkpoint(args.m or "", full=args.full,
                                             wait_ready=args.wait, background=args.background)
    if args.json:
        out(args, ck)
    else:
        print(ck.id)
        print(f"({_timings(ck.timings_ms)}{'; pending' if ck.pending else ''})",
              file=sys.stderr)
    return 0


def cmd_restore(args, client) -> int:
    res = client.get(args.sandbox).rollback(args.checkpoint)
    out(args, {"sandbox": res.sandbox.id, "path": res.path, "timings_ms": res.timings_ms},
        lambda: f"{res.sandbox.name} rolled back to {args.checkpoint} via {res.path} "
                f"({_timings(res.timings_ms)})")
    return 0


def cmd_fork(args, client) -> int:
    children = client.fork(args.checkpoint, args.n)
    rows = [{"sandbox": c.sandbox.id if c.sandbox else "",
             "error": f"{type(c.error).__name__}: {c.error.message}" if c.error else ""}
            for c in children]
    out(args, rows, lambda: "\n".join(r["sandbox"] or r["error"] for r in rows))
    return 0 if all(c.sandbox for c in children) else 1


def cmd_warm(args, client) -> int:
    ready = client.warm(args.checkpoint, args.n, wait=args.wait)
    out(args, {"checkpoint": args.checkpoint, "ready": ready},
        lambda: f"{ready} of {args.n} ready" + ("" if args.wait else " (more on the way)"))
    return 0


def cmd_tree(args, client) -> int:
    sbx = client.get(args.sandbox)
    ckpts = sbx.checkpoints()
    if args.json:
        out(args, ckpts)
        return 0
    import datetime

    import rich.markup
    from rich.console import Console
    from rich.tree import Tree
    head = sbx.info
    children: dict[str, list] = {}
    ids = {c.id for c in ckpts}
    for c in ckpts:
        children.setdefault(c.parent_id if c.parent_id in ids else "", []).append(c)
    root = Tree(f"[bold]{head.name}[/] ({head.id}, image {head.image})")

    def add(node, parent_id):
        for c in children.get(parent_id, []):
            when = datetime.datetime.fromtimestamp(c.created_at).strftime("%H:%M:%S")
            # (escaped: rich would take "[pinned]" for markup and print nothing)
            pin = (r" \[pinned]" if c.pinned else "") + (r" \[ready]" if c.ready else "")
            label = f" {c.label!r}" if c.label else ""
            bad = "" if c.restorable else \
                f" [red]UNUSABLE[/]: {rich.markup.escape(c.unusable_reason)}"
            add(node.add(f"{c.id}{label} {when} depth {len(c.layer_ids)}{pin}{bad}"), c.id)
    add(root, "")
    Console().print(root)
    return 0


def cmd_diff(args, client) -> int:
    entries = client.diff(args.a, args.b)
    out(args, [{"path": e.path, "change": e.change} for e in entries],
        lambda: "\n".join(f"{_CHANGE_LETTER.get(e.change, '?')} {e.path}" for e in entries)
        or "(no changes)")
    return 0


def cmd_checkpoint(args, client) -> int:
    if args.checkpoint_cmd == "rm":
        for cid in args.checkpoints:
            client.delete_checkpoint(cid, cascade=args.cascade)
        out(args, {"deleted": args.checkpoints}, lambda: "deleted " + " ".join(args.checkpoints))
    elif args.checkpoint_cmd == "wait":
        info = client.wait_checkpoint(args.checkpoint)
        out(args, info, lambda: f"{info.id} recorded ({_timings(info.timings_ms)})")
    else:
        info = client.pin_checkpoint(args.checkpoint, pinned=not args.unpin)
        out(args, info, lambda: f"{info.id} {'pinned' if info.pinned else 'unpinned'}")
    return 0


def cmd_export(args, client) -> int:
    """`deltabox export CHECKPOINT [-o FILE|-]`: stdout when -o is - or absent and stdout
    is not a terminal."""
    target = args.o
    if target is None:
        if sys.stdout.isatty():
            print("deltabox export: give -o FILE (or -o - to write to stdout)", file=sys.stderr)
            return 2
        target = "-"
    res = client.export_checkpoint(args.checkpoint,
                                   sys.stdout.buffer if target == "-" else target)
    summary = (f"exported {res.checkpoint_id}: {res.bytes_sent:,} bytes, "
               f"{res.layers_sent} layer(s)")
    print(summary, file=sys.stderr)
    return 0


def cmd_import(args, client) -> int:
    """`deltabox import [FILE|-]`: stdin when FILE is - or absent."""
    src = sys.stdin.buffer if args.file in (None, "-") else args.file
    info = client.import_checkpoint(src)
    out(args, info, lambda: info.id)
    return 0
