"""The `deltabox` command line: the daemon, and a client for every API call.

Every listing prints a rich table, or JSON with --json. `exec` propagates the
command's exit status (128 + signal when it was killed).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from deltabox.errors import DeltaboxError

__all__ = ["main"]


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 512M, 2G)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--env expects NAME=VALUE, got {item!r}")
        env[k] = v
    return env


def _out(args, obj, table=None) -> None:
    """Print `obj` as JSON (--json) or via `table()` (a rich renderable)."""
    if args.json:
        if hasattr(obj, "DESCRIPTOR"):
            obj = MessageToDict(obj, preserving_proto_field_name=True)
        elif isinstance(obj, list):
            obj = [MessageToDict(o, preserving_proto_field_name=True)
                   if hasattr(o, "DESCRIPTOR") else o for o in obj]
        print(json.dumps(obj, indent=2, default=str))
    elif table is not None:
        from rich.console import Console
        Console().print(table())


def _table(columns: list[str], rows: list[list]):
    from rich.table import Table
    t = Table(*columns, box=None, header_style="bold")
    for r in rows:
        t.add_row(*[str(c) for c in r])
    return t


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


_STATE = {0: "?", 1: "creating", 2: "running", 3: "stopped", 4: "broken"}


# ---- commands ----------------------------------------------------------------------------

def _apply_config_file(args, path: str) -> None:
    """Fill the daemon's options from a TOML file (`deltabox daemon --config PATH`).

    Its keys are the long flags without "--" (`socket-group = "deltabox"`, `durable = true`,
    `image-dir = ["/a", "/b"]`), parsed by the same parser as the flags; a flag given on the
    command line wins over the file."""
    import tomllib
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"deltabox daemon: --config {path}: {e}") from None
    if "token" in table or "config" in table:
        raise SystemExit(f"deltabox daemon: --config {path}: use token-file, not token")
    argv: list[str] = []
    for key, value in table.items():
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                argv.append(f"--{key}")
            elif v is not False:
                argv += [f"--{key}", str(v)]
    parser = build_parser()
    from_file = parser.parse_args(["daemon", *argv])
    defaults = parser.parse_args(["daemon"])
    for name, value in vars(from_file).items():
        if getattr(args, name, None) == getattr(defaults, name):
            setattr(args, name, value)


def cmd_daemon(args) -> int:
    from deltabox.client import TOKEN_ENV, load_token
    from deltabox.config import Config
    from deltabox.server.app import run_daemon
    if args.token is not None:
        raise SystemExit("deltabox daemon: --token is refused: any host user can read it in "
                         "/proc/<pid>/cmdline. Use --token-file PATH (a chmod-600 file) or "
                         f"${TOKEN_ENV}")
    if args.config:
        _apply_config_file(args, args.config)
    cfg = Config()
    if args.state_dir:
        cfg.state_dir = Path(args.state_dir)
    if args.daemon_socket or args.socket:
        cfg.socket = Path(args.daemon_socket or args.socket)
    cfg.store_size = args.store_size
    cfg.durable = args.durable
    cfg.standby = not args.no_standby
    if args.warm_budget is not None:
        cfg.warm_budget_bytes = args.warm_budget
    if args.default_disk is not None:
        cfg.default_disk_bytes = args.default_disk
    cfg.tcp_address = args.tcp
    cfg.tls_cert = Path(args.tls_cert) if args.tls_cert else None
    cfg.tls_key = Path(args.tls_key) if args.tls_key else None
    try:
        cfg.token = load_token(args.daemon_token_file or args.token_file)
    except ValueError as e:
        raise SystemExit(f"deltabox daemon: {e}") from None
    os.environ.pop(TOKEN_ENV, None)  # sandboxes and helpers must not inherit it
    cfg.socket_group = args.socket_group
    if args.max_image_bytes is not None:
        cfg.max_image_bytes = args.max_image_bytes
    if args.max_image_entries is not None:
        cfg.max_image_entries = args.max_image_entries
    if args.image_dir:
        cfg.image_dirs = tuple(Path(d).resolve() for d in args.image_dir)
    if args.store_reserve is not None:
        cfg.store_reserve = args.store_reserve
    if args.store_reserve_inodes is not None:
        cfg.store_reserve_inodes = args.store_reserve_inodes
    from deltabox.core.images import ImportLimits
    from deltabox.store.space import StoreSpace
    try:
        ImportLimits.from_config(cfg)  # refuse bad limits now, not at the first import
        StoreSpace(cfg.state_dir, cfg.store_reserve, cfg.store_reserve_inodes)
    except ValueError as e:
        raise SystemExit(f"deltabox daemon: {e}") from None
    run_daemon(cfg)
    return 0


def cmd_image_import(args, client) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
    if args.json:
        img = client.import_image(args.name, args.source, replace=args.replace)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                      transient=True) as prog:
            task = prog.add_task("importing", total=None)

            def update(msg):
                if msg.phase.startswith("warning:"):  # e.g. dropped device nodes: keep it
                    prog.console.print(msg.phase)
                prog.update(task, description=msg.phase, completed=msg.done_bytes,
                            total=msg.total_bytes or None)
            img = client.import_image(args.name, args.source, replace=args.replace,
                                      progress=update)
    _out(args, img, lambda: f"imported {img.name}: {len(img.layer_ids)} layer(s), "
                            f"{_human(img.size_bytes)} ({img.source_format})")
    return 0


def cmd_image_ls(args, client) -> int:
    images = client.list_images()
    _out(args, images, lambda: _table(
        ["NAME", "LAYERS", "SIZE", "FORMAT", "SOURCE"],
        [[i.name, len(i.layer_ids), _human(i.size_bytes), i.source_format, i.source]
         for i in images]))
    return 0


def cmd_image_rm(args, client) -> int:
    for name in args.names:
        client.remove_image(name)
    _out(args, {"removed": args.names}, lambda: "removed " + " ".join(args.names))
    return 0


def cmd_create(args, client) -> int:
    sbx = client.create(args.image, args.name or "", memory=args.memory or 0,
                        pids=args.pids or 0, cpus=args.cpus or 0.0, network=args.network,
                        env=_parse_env(args.env), hostname=args.hostname or "",
                        disk=args.disk or 0, disk_inodes=args.disk_inodes or 0)
    if args.json:
        _out(args, sbx.info)
    else:
        print(sbx.id)
    return 0


def cmd_ls(args, client) -> int:
    boxes = [s.info for s in client.list()]
    _out(args, boxes, lambda: _table(
        ["ID", "NAME", "IMAGE", "STATE", "MEMORY", "PIDS", "DISK", "NETWORK", "INIT PID"],
        [[b.id, b.name, b.image, _STATE.get(b.state, b.state), _human(b.limits.memory_bytes),
          b.limits.pids, _human(b.limits.disk_bytes) if b.limits.disk_bytes else "-",
          "nat" if b.network == 2 else "none", b.init_pid or "-"]
         for b in boxes]))
    return 0


def cmd_rm(args, client) -> int:
    for ref in args.sandboxes:
        client.get(ref).destroy()
    _out(args, {"destroyed": args.sandboxes}, lambda: "destroyed " + " ".join(args.sandboxes))
    return 0


def cmd_exec(args, client) -> int:
    sbx = client.get(args.sandbox)
    cmd = list(args.cmd)
    if not cmd:
        raise SystemExit("exec: missing command (deltabox exec SANDBOX -- CMD...)")
    if args.session:
        code = " ".join(cmd) if len(cmd) > 1 else cmd[0]
        res = sbx.session(args.session).run(code, timeout=args.timeout or 0)
        if args.json:
            _out(args, {"exit_code": res.exit_code, "stdout": res.stdout.decode(errors="replace"),
                        "stderr": res.stderr.decode(errors="replace")})
        else:
            sys.stdout.buffer.write(res.stdout)
            sys.stderr.buffer.write(res.stderr)
        return res.exit_code
    stdin = sys.stdin.buffer.read() if args.stdin else b""
    if args.detach:
        if args.timeout:
            raise SystemExit("exec: --timeout does not apply to --detach (use `deltabox wait "
                             "--timeout`)")
        proc = sbx.exec(cmd, detach=True, env=_parse_env(args.env), cwd=args.cwd or "",
                        stdin=stdin)
        _out(args, proc.info, lambda: proc.id)
        return 0
    events = sbx.exec_stream(cmd, env=_parse_env(args.env), cwd=args.cwd or "",
                             stdin=stdin, timeout=args.timeout or 0)
    out, err, exit_ = _relay(args, events)
    if args.json:
        _out(args, {"exit_code": exit_.exit_code, "signal": exit_.signal,
                    "timed_out": exit_.timed_out, "stdout": b"".join(out).decode(errors="replace"),
                    "stderr": b"".join(err).decode(errors="replace")})
    if exit_.timed_out and not args.json:
        print(f"deltabox: timed out after {args.timeout}s", file=sys.stderr)
    return exit_.exit_code if exit_.signal == 0 else 128 + exit_.signal


def _relay(args, events) -> tuple[list[bytes], list[bytes], object]:
    """Copy an exec's (or a process's) output events to our stdout/stderr as they come,
    or collect them for --json; returns (stdout chunks, stderr chunks, the exit or None)."""
    out, err, exit_ = [], [], None
    for ev in events:
        which = ev.WhichOneof("event")
        if which == "stdout":
            out.append(ev.stdout) if args.json else (sys.stdout.buffer.write(ev.stdout),
                                                     sys.stdout.flush())
        elif which == "stderr":
            err.append(ev.stderr) if args.json else (sys.stderr.buffer.write(ev.stderr),
                                                     sys.stderr.flush())
        elif which == "exit":
            exit_ = ev.exit
    return out, err, exit_


def _process_state(p) -> str:
    if p.running:
        return "running"
    return f"exited {p.exit_code}" if p.signal == 0 else f"killed by signal {p.signal}"


def _process_status(p) -> int:
    """A shell's view of how it ended: the exit code, or 128 + the signal."""
    return p.exit_code if p.signal == 0 else 128 + p.signal


def cmd_ps(args, client) -> int:
    procs = client.get(args.sandbox).processes()
    _out(args, procs, lambda: _table(
        ["ID", "PID", "STATE", "OUTPUT", "COMMAND"],
        [[p.id, p.pid, _process_state(p), _human(p.stdout_bytes + p.stderr_bytes), p.command]
         for p in procs]))
    return 0


def cmd_logs(args, client) -> int:
    proc = client.get(args.sandbox).process(args.process)
    out, err, exit_ = _relay(args, proc.logs_stream(follow=args.follow))
    if args.json:
        _out(args, {"stdout": b"".join(out).decode(errors="replace"),
                    "stderr": b"".join(err).decode(errors="replace"),
                    "running": exit_ is None,
                    **({"exit_code": exit_.exit_code, "signal": exit_.signal,
                        "stdout_truncated": exit_.stdout_truncated,
                        "stderr_truncated": exit_.stderr_truncated} if exit_ else {})})
    return 0


def cmd_kill(args, client) -> int:
    sig = args.signal.upper().removeprefix("SIG")
    try:
        number = int(sig) if sig.isdigit() else int(getattr(signal, f"SIG{sig}"))
    except AttributeError:
        raise SystemExit(f"kill: unknown signal {args.signal!r}") from None
    info = client.get(args.sandbox).process(args.process).signal(number)
    _out(args, info, lambda: f"sent signal {number} to {info.id} (pid {info.pid})")
    return 0


def cmd_wait(args, client) -> int:
    info = client.get(args.sandbox).process(args.process).wait(timeout=args.timeout or 0)
    _out(args, info, lambda: f"{info.id}: {_process_state(info)}")
    return _process_status(info)


def cmd_session(args, client) -> int:
    sbx = client.get(args.sandbox)
    if args.session_cmd == "open":
        s = sbx.open_session(args.kind, args.name or "")
        _out(args, s.info, lambda: s.name)
    elif args.session_cmd == "ls":
        sessions = sbx.list_sessions()
        kinds = {1: "bash", 2: "sh", 3: "python"}
        _out(args, sessions, lambda: _table(["NAME", "KIND", "PID"],
                                            [[s.name, kinds.get(s.kind, "?"), s.pid]
                                             for s in sessions]))
    else:
        sbx.session(args.name).close()
    return 0


def cmd_shell(args, client) -> int:
    import grpc
    import termios
    import tty

    from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
    from deltabox.client import _error
    sbx = client.get(args.sandbox)
    cols, rows = shutil.get_terminal_size()
    inbox: queue.Queue = queue.Queue()
    inbox.put(pb.ShellInput(start=pb.ShellStart(sandbox=sbx.id, argv=args.cmd or [],
                                                rows=rows, cols=cols)))

    def requests():
        while (msg := inbox.get()) is not None:
            yield msg

    def read_stdin():
        fd = sys.stdin.fileno()
        while data := os.read(fd, 4096):
            inbox.put(pb.ShellInput(stdin=data))

    def on_winch(*_):
        c, r = shutil.get_terminal_size()
        inbox.put(pb.ShellInput(resize=pb.WindowSize(rows=r, cols=c)))

    is_tty = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if is_tty else None
    if is_tty:
        tty.setraw(sys.stdin)
        signal.signal(signal.SIGWINCH, on_winch)
    threading.Thread(target=read_stdin, daemon=True).start()
    code = 0
    try:
        for out in client._stubs["sandboxes"].Shell(requests()):
            if out.WhichOneof("output") == "data":
                sys.stdout.buffer.write(out.data)
                sys.stdout.flush()
            else:
                code = out.exit.exit_code if out.exit.signal == 0 else 128 + out.exit.signal
    except grpc.RpcError as e:
        raise _error(e) from None
    finally:
        inbox.put(None)
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
    return code


def cmd_status(args, client) -> int:
    st = client.status()
    _out(args, st, lambda: _table(["FIELD", "VALUE"], [
        ["version", st.version], ["state dir", st.state_dir],
        ["store", f"{st.store_backing}, {_human(st.store_free_bytes)} free of "
                  f"{_human(st.store_size_bytes)}"],
        ["store inodes", f"{st.store_free_inodes:,} free of {st.store_inodes:,}"],
        ["store reserve", f"{_human(st.store_reserve_bytes)}, "
                          f"{st.store_reserve_inodes:,} inodes"
                          + (" (below it: new work refused)" if st.store_below_reserve else "")],
        ["sandboxes", st.sandboxes], ["images", st.images],
        ["criu", st.criu_version or "not installed"], ["disk quotas", st.disk_quotas],
        ["uptime", f"{st.uptime_seconds:.0f}s"]]))
    return 0


def cmd_stats(args, client) -> int:
    st = client.stats()
    if args.prometheus:
        print(st.prometheus_text)
        return 0
    _out(args, list(st.operations), lambda: _table(
        ["OPERATION", "COUNT", "P50 MS", "P95 MS"],
        [[o.operation, o.count, f"{o.p50_ms:.2f}", f"{o.p95_ms:.2f}"] for o in st.operations]))
    return 0


def _timings(t: dict) -> str:
    return ", ".join(f"{k.removesuffix('_ms')} {v:.2f} ms" for k, v in sorted(t.items()))


def cmd_snapshot(args, client) -> int:
    ck = client.get(args.sandbox).checkpoint(args.m or "", full=args.full,
                                             wait_ready=args.wait)
    if args.json:
        _out(args, ck)
    else:
        print(ck.id)
        print(f"({_timings(dict(ck.timings_ms))})", file=sys.stderr)
    return 0


def cmd_restore(args, client) -> int:
    res = client.get(args.sandbox).rollback(args.checkpoint)
    _out(args, {"sandbox": res.sandbox.id, "path": res.path, "timings_ms": res.timings_ms},
         lambda: f"{res.sandbox.name} rolled back to {args.checkpoint} via {res.path} "
                 f"({_timings(res.timings_ms)})")
    return 0


def cmd_fork(args, client) -> int:
    children = client.fork(args.checkpoint, args.n)
    rows = [{"sandbox": c.sandbox.id if c.sandbox else "",
             "error": f"{type(c.error).__name__}: {c.error.message}" if c.error else ""}
            for c in children]
    _out(args, rows, lambda: "\n".join(r["sandbox"] or r["error"] for r in rows))
    return 0 if all(c.sandbox for c in children) else 1


def cmd_warm(args, client) -> int:
    ready = client.warm(args.checkpoint, args.n, wait=args.wait)
    _out(args, {"checkpoint": args.checkpoint, "ready": ready},
         lambda: f"{ready} of {args.n} ready" + ("" if args.wait else " (more on the way)"))
    return 0


def cmd_tree(args, client) -> int:
    sbx = client.get(args.sandbox)
    ckpts = sbx.checkpoints()
    if args.json:
        _out(args, ckpts)
        return 0
    from rich.console import Console
    from rich.tree import Tree
    import datetime
    import rich.markup
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
    _out(args, [{"path": p, "change": c} for p, c in entries],
         lambda: "\n".join(f"{ {'added': 'A', 'modified': 'M', 'deleted': 'D'}[c]} {p}"
                           for p, c in entries) or "(no changes)")
    return 0


def cmd_checkpoint(args, client) -> int:
    if args.checkpoint_cmd == "rm":
        for cid in args.checkpoints:
            client.delete_checkpoint(cid, cascade=args.cascade)
        _out(args, {"deleted": args.checkpoints}, lambda: "deleted " + " ".join(args.checkpoints))
    else:
        info = client.pin_checkpoint(args.checkpoint, pinned=not args.unpin)
        _out(args, info, lambda: f"{info.id} {'pinned' if info.pinned else 'unpinned'}")
    return 0


# ---- parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltabox", description="DeltaBox sandboxes with "
                                "millisecond checkpoint, rollback and fork")
    p.add_argument("--socket", help="daemon socket (default /run/deltabox/deltabox.sock), "
                   "or HOST:PORT of a daemon on TCP")
    p.add_argument("--tls-ca", metavar="PATH", help="the TCP daemon's certificate or its CA")
    p.add_argument("--token-file", metavar="PATH",
                   help="the TCP daemon's bearer token, in a chmod-600 file (or DELTABOX_TOKEN)")
    # Refused (it would show in /proc/<pid>/cmdline); also keeps `--token` from being
    # taken as an abbreviation of --token-file.
    p.add_argument("--token", dest="client_token", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("daemon", help="run the daemon (as root)")
    d.add_argument("--config", metavar="PATH",
                   help="TOML file of these options, keys without '--' (flags given win)")
    d.add_argument("--state-dir")
    d.add_argument("--socket", dest="daemon_socket", help="where to listen")
    d.add_argument("--store-size", default="64G", help="size of the loop-backed XFS image")
    d.add_argument("--durable", action="store_true",
                   help="fsync every commit and layer (survives power loss; slower)")
    d.add_argument("--warm-budget", type=_parse_size, default=None,
                   help="memory for body doubles and warm fork pools (default 4G)")
    d.add_argument("--default-disk", type=_parse_size, default=None,
                   help="per-sandbox disk limit when create gives none (default 10G; 0 = none; "
                   "an XFS project quota: see `deltabox status`)")
    d.add_argument("--no-standby", action="store_true",
                   help="do not keep a ready incarnation for fast rollback")
    d.add_argument("--tcp", help="also listen on HOST:PORT (needs --tls-cert, --tls-key and "
                   "--token-file or DELTABOX_TOKEN)")
    d.add_argument("--tls-cert")
    d.add_argument("--tls-key")
    d.add_argument("--token-file", dest="daemon_token_file", metavar="PATH",
                   help="bearer token for TCP clients, in a chmod-600 file (or DELTABOX_TOKEN)")
    d.add_argument("--token", help=argparse.SUPPRESS)  # refused: it would show in cmdline
    d.add_argument("--image-dir", action="append", metavar="DIR",
                   help="a directory image imports may read from (repeatable; writable by root "
                   "only; default $DELTABOX_CACHE/images)")
    d.add_argument("--socket-group", metavar="NAME|GID",
                   help="group that may use the unix socket (0660; its directory becomes "
                   "root:GROUP 0750); default root")
    d.add_argument("--store-reserve", metavar="SIZE|PCT",
                   help="refuse new sandboxes, checkpoints, forks and imports while the "
                        "store has less free space than this, e.g. 1G or 5%% (default: 5%%, "
                        "at most 4G; 0 = never)")
    d.add_argument("--store-reserve-inodes", metavar="N|PCT",
                   help="the same for the store's free inodes (default: 1%%)")
    d.add_argument("--max-image-bytes", type=_parse_size, default=None,
                   help="refuse an image import that writes more file data (default 64G)")
    d.add_argument("--max-image-entries", type=int, default=None,
                   help="refuse an image import that creates more entries, i.e. inodes "
                   "(default 2000000)")
    d.set_defaults(func=cmd_daemon, needs_client=False)

    img = sub.add_parser("image", help="manage images").add_subparsers(dest="image_cmd",
                                                                     required=True)
    i = img.add_parser("import", help="import a tarball, directory, docker-save or OCI image")
    i.add_argument("name")
    i.add_argument("source")
    i.add_argument("--replace", action="store_true")
    i.set_defaults(func=cmd_image_import)
    img.add_parser("ls", help="list images").set_defaults(func=cmd_image_ls)
    r = img.add_parser("rm", help="remove images")
    r.add_argument("names", nargs="+")
    r.set_defaults(func=cmd_image_rm)

    c = sub.add_parser("create", help="create and start a sandbox; prints its id")
    c.add_argument("image")
    c.add_argument("--name")
    c.add_argument("--memory", type=_parse_size, help="memory limit, e.g. 512M")
    c.add_argument("--pids", type=int, help="max number of processes")
    c.add_argument("--cpus", type=float, help="cpu quota in cores")
    c.add_argument("--network", choices=["none", "nat"], default="none")
    c.add_argument("--env", action="append", metavar="NAME=VALUE")
    c.add_argument("--hostname")
    c.add_argument("--disk", type=_parse_size,
                   help="what it may write into the store, e.g. 10G (default: the daemon's)")
    c.add_argument("--disk-inodes", type=int, help="files it may create (default: one per KiB "
                   "of --disk)")
    c.set_defaults(func=cmd_create)

    e = sub.add_parser("exec", help="run a command in a sandbox (exit code propagates)")
    e.add_argument("sandbox")
    e.add_argument("--session", help="run in this persistent session instead")
    e.add_argument("--timeout", type=float)
    e.add_argument("--cwd")
    e.add_argument("--env", action="append", metavar="NAME=VALUE")
    e.add_argument("--stdin", action="store_true", help="pass our stdin to the command")
    e.add_argument("--detach", "-d", action="store_true",
                   help="start it and print its process id at once (see ps, logs, kill, wait)")
    e.add_argument("cmd", nargs="*", help="the command, after --")
    e.set_defaults(func=cmd_exec)

    ps = sub.add_parser("ps", help="detached execs of a sandbox (exec --detach)")
    ps.add_argument("sandbox")
    ps.set_defaults(func=cmd_ps)
    lg = sub.add_parser("logs", help="output of a detached exec (the newest 1 MiB per stream)")
    lg.add_argument("sandbox")
    lg.add_argument("process")
    lg.add_argument("--follow", "-f", action="store_true", help="then live output until it ends")
    lg.set_defaults(func=cmd_logs)
    kl = sub.add_parser("kill", help="signal a detached exec's process group")
    kl.add_argument("sandbox")
    kl.add_argument("process")
    kl.add_argument("--signal", "-s", default="TERM", help="name or number (default TERM)")
    kl.set_defaults(func=cmd_kill)
    wt = sub.add_parser("wait", help="wait for a detached exec to end; its status propagates")
    wt.add_argument("sandbox")
    wt.add_argument("process")
    wt.add_argument("--timeout", type=float, help="give up after this many seconds")
    wt.set_defaults(func=cmd_wait)

    sh = sub.add_parser("shell", help="interactive terminal in a sandbox")
    sh.add_argument("sandbox")
    sh.add_argument("cmd", nargs="*")
    sh.set_defaults(func=cmd_shell)

    s = sub.add_parser("session", help="persistent sessions").add_subparsers(
        dest="session_cmd", required=True)
    so = s.add_parser("open")
    so.add_argument("sandbox")
    so.add_argument("--kind", choices=["bash", "sh", "python"], default="bash")
    so.add_argument("--name")
    sl = s.add_parser("ls")
    sl.add_argument("sandbox")
    sc = s.add_parser("close")
    sc.add_argument("sandbox")
    sc.add_argument("name")
    for x in (so, sl, sc):
        x.set_defaults(func=cmd_session)

    dm = sub.add_parser("demo", help="a guided tour on a throw-away daemon (as root)")
    dm.set_defaults(func=lambda args: __import__("deltabox.demo").demo.main(), needs_client=False)

    bn = sub.add_parser("bench", help="benchmarks on a throw-away daemon (as root)")
    bsub = bn.add_subparsers(dest="bench_cmd", required=True)
    bf = bsub.add_parser("fs", help="DeltaFS checkpoint, rollback and fork vs copytree, cp, tar")
    bf.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="a JSON document on stdout (progress on stderr)")
    bf.add_argument("--quick", action="store_true", help="a reduced matrix (well under 2 min)")
    bf.add_argument("--iterations", type=int, help="samples per cell (default 20, quick 5)")
    bf.add_argument("--tree", action="append", help="django, mono (>= 20,000 files), "
                    "synthetic:N or sdist:NAME==VERSION[,...]; repeatable")
    bf.set_defaults(func=lambda args: __import__("deltabox.bench").bench.main_fs(args),
                    needs_client=False)
    bc = bsub.add_parser("cr", help="DeltaCR full checkpoint, rollback (double / restore) and "
                         "fork at 10/100/1000 MB vs plain CRIU dump/restore + copytree")
    bc.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="a JSON document on stdout (progress on stderr)")
    bc.add_argument("--quick", action="store_true",
                    help="10 MB only, fork 1 and 16, fewer iterations (about 2 min)")
    bc.add_argument("--iterations", type=int,
                    help="samples per cell (default 20, quick 5; fewer for 1000 MB, forks and "
                    "baselines)")
    bc.set_defaults(func=lambda args: __import__("deltabox.bench").bench.main_cr(args),
                    needs_client=False)

    sub.add_parser("ls", help="list sandboxes").set_defaults(func=cmd_ls)
    rm = sub.add_parser("rm", help="destroy sandboxes")
    rm.add_argument("sandboxes", nargs="+")
    rm.set_defaults(func=cmd_rm)
    sub.add_parser("status", help="daemon status").set_defaults(func=cmd_status)
    st = sub.add_parser("stats", help="operation latencies")
    st.add_argument("--prometheus", action="store_true")
    st.set_defaults(func=cmd_stats)

    sn = sub.add_parser("snapshot", help="checkpoint a sandbox; prints the checkpoint id")
    sn.add_argument("sandbox")
    sn.add_argument("-m", help="label")
    sn.add_argument("--full", action="store_true", help="include processes (DeltaCR)")
    sn.add_argument("--wait", action="store_true",
                    help="return once its body double / standby is ready (fast rollback)")
    rs = sub.add_parser("restore", help="roll a sandbox back to a checkpoint")
    rs.add_argument("sandbox")
    rs.add_argument("checkpoint")
    fk = sub.add_parser("fork", help="new sandboxes from a checkpoint")
    fk.add_argument("checkpoint")
    fk.add_argument("-n", type=int, default=1)
    wm = sub.add_parser("warm", help="prepare N incarnations of a checkpoint for a fork")
    wm.add_argument("checkpoint")
    wm.add_argument("-n", type=int, default=1)
    wm.add_argument("--wait", action="store_true", help="return once they are ready")
    wm.set_defaults(func=cmd_warm)
    tr = sub.add_parser("tree", help="a sandbox's checkpoint tree")
    tr.add_argument("sandbox")
    df = sub.add_parser("diff", help="paths changed between two checkpoints (or a sandbox)")
    df.add_argument("a")
    df.add_argument("b")
    for x, f in ((sn, cmd_snapshot), (rs, cmd_restore), (fk, cmd_fork), (tr, cmd_tree),
                 (df, cmd_diff)):
        x.set_defaults(func=f)
    ck = sub.add_parser("checkpoint", help="delete or pin checkpoints").add_subparsers(
        dest="checkpoint_cmd", required=True)
    ckr = ck.add_parser("rm", help="delete checkpoints (layers are freed when unused)")
    ckr.add_argument("checkpoints", nargs="+")
    ckr.add_argument("--cascade", action="store_true", help="also delete descendants")
    ckp = ck.add_parser("pin", help="pin (or --unpin) a checkpoint")
    ckp.add_argument("checkpoint")
    ckp.add_argument("--unpin", action="store_true")
    for x in (ckr, ckp):
        x.set_defaults(func=cmd_checkpoint)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse cannot mix optionals with a "--"-terminated command after a
    # subcommand's positional; split the command off ourselves.
    tail: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if tail is not None:
        if not hasattr(args, "cmd"):
            raise SystemExit(f"deltabox {args.command}: unexpected arguments after --")
        args.cmd = list(args.cmd) + tail
    if args.client_token is not None:
        print("deltabox: --token is refused: any host user can read it in /proc/<pid>/cmdline. "
              "Use --token-file PATH (a chmod-600 file) or $DELTABOX_TOKEN", file=sys.stderr)
        return 2
    if not getattr(args, "needs_client", True):
        return args.func(args)
    from deltabox.client import Client
    try:
        client = Client(args.socket, tls_ca=args.tls_ca, token_file=args.token_file)
    except (ValueError, OSError) as e:
        print(f"deltabox: {e}", file=sys.stderr)
        return 2
    try:
        with client:
            return args.func(args, client)
    except DeltaboxError as e:
        print(f"deltabox: {type(e).__name__}: {e.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
