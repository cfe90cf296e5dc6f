"""CLI commands about images, sandboxes and what runs in them: image import/ls/rm, create,
ls, rm, exec, ps, logs, kill, wait, session, shell, status, stats.

Each `cmd_*` takes the parsed arguments and a `deltabox.Client` and returns the exit
status; `exec` and `wait` propagate the command's (128 + signal when it was killed).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading

from deltabox.cli.output import human, out, parse_env, table

__all__ = ["cmd_image_import", "cmd_image_ls", "cmd_image_rm", "cmd_create", "cmd_ls",
           "cmd_rm", "cmd_exec", "cmd_ps", "cmd_logs", "cmd_kill", "cmd_wait", "cmd_session",
           "cmd_shell", "cmd_status", "cmd_stats"]


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
    out(args, img, lambda: f"imported {img.name}: {len(img.layer_ids)} layer(s), "
                           f"{human(img.size_bytes)} ({img.source_format})")
    return 0


def cmd_image_ls(args, client) -> int:
    images = client.list_images()
    out(args, images, lambda: table(
        ["NAME", "LAYERS", "SIZE", "FORMAT", "SOURCE"],
        [[i.name, len(i.layer_ids), human(i.size_bytes), i.source_format, i.source]
         for i in images]))
    return 0


def cmd_image_rm(args, client) -> int:
    for name in args.names:
        client.remove_image(name)
    out(args, {"removed": args.names}, lambda: "removed " + " ".join(args.names))
    return 0


def cmd_create(args, client) -> int:
    sbx = client.create(args.image, args.name or "", memory=args.memory or 0,
                        pids=args.pids or 0, cpus=args.cpus or 0.0, network=args.network,
                        env=parse_env(args.env), hostname=args.hostname or "",
                        disk=args.disk or 0, disk_inodes=args.disk_inodes or 0)
    if args.json:
        out(args, sbx.info)
    else:
        print(sbx.id)
    return 0


def cmd_ls(args, client) -> int:
    boxes = [s.info for s in client.list()]
    out(args, boxes, lambda: table(
        ["ID", "NAME", "IMAGE", "STATE", "MEMORY", "PIDS", "DISK", "NETWORK", "INIT PID"],
        [[b.id, b.name, b.image, b.state or "?", human(b.limits.memory_bytes), b.limits.pids,
          human(b.limits.disk_bytes) if b.limits.disk_bytes else "-", b.network,
          b.init_pid or "-"]
         for b in boxes]))
    return 0


def cmd_rm(args, client) -> int:
    for ref in args.sandboxes:
        client.get(ref).destroy()
    out(args, {"destroyed": args.sandboxes}, lambda: "destroyed " + " ".join(args.sandboxes))
    return 0


def _exit_status(exit_code: int, sig: int) -> int:
    """A shell's view of how a command ended: its exit code, or 128 + the signal."""
    return exit_code if sig == 0 else 128 + sig


def cmd_exec(args, client) -> int:
    sbx = client.get(args.sandbox)
    cmd = list(args.cmd)
    if not cmd:
        raise SystemExit("exec: missing command (deltabox exec SANDBOX -- CMD...)")
    if args.session:
        code = " ".join(cmd) if len(cmd) > 1 else cmd[0]
        res = sbx.session(args.session).run(code, timeout=args.timeout or 0)
        if args.json:
            out(args, {"exit_code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr})
        else:
            sys.stdout.buffer.write(res.stdout)
            sys.stderr.buffer.write(res.stderr)
        return res.exit_code
    stdin = sys.stdin.buffer.read() if args.stdin else b""
    if args.detach:
        if args.timeout:
            raise SystemExit("exec: --timeout does not apply to --detach (use `deltabox wait "
                             "--timeout`)")
        proc = sbx.exec(cmd, detach=True, env=parse_env(args.env), cwd=args.cwd or "",
                        stdin=stdin)
        out(args, proc.info, lambda: proc.id)
        return 0
    events = sbx.exec_stream(cmd, env=parse_env(args.env), cwd=args.cwd or "",
                             stdin=stdin, timeout=args.timeout or 0)
    stdout, stderr, exit_ = _relay(args, events)
    if args.json:
        out(args, {"exit_code": exit_.exit_code, "signal": exit_.signal,
                   "timed_out": exit_.timed_out, "stdout": stdout, "stderr": stderr})
    if exit_.timed_out and not args.json:
        print(f"deltabox: timed out after {args.timeout}s", file=sys.stderr)
    return _exit_status(exit_.exit_code, exit_.signal)


def _relay(args, events) -> tuple[bytes, bytes, object]:
    """Copy an exec's (or a process's) output events to our stdout/stderr as they come,
    or collect them for --json; returns (stdout, stderr, the ExecExit or None)."""
    stdout, stderr, exit_ = [], [], None
    for ev in events:
        if ev.kind in ("stdout", "stderr"):
            data = getattr(ev, ev.kind)
            if args.json:
                (stdout if ev.kind == "stdout" else stderr).append(data)
            else:
                stream = sys.stdout if ev.kind == "stdout" else sys.stderr
                stream.buffer.write(data)
                stream.flush()
        elif ev.kind == "exit":
            exit_ = ev.exit
    return b"".join(stdout), b"".join(stderr), exit_


def _process_state(p) -> str:
    if p.running:
        return "running"
    return f"exited {p.exit_code}" if p.signal == 0 else f"killed by signal {p.signal}"


def cmd_ps(args, client) -> int:
    procs = client.get(args.sandbox).processes()
    out(args, procs, lambda: table(
        ["ID", "PID", "STATE", "OUTPUT", "COMMAND"],
        [[p.id, p.pid, _process_state(p), human(p.stdout_bytes + p.stderr_bytes), p.command]
         for p in procs]))
    return 0


def cmd_logs(args, client) -> int:
    proc = client.get(args.sandbox).process(args.process)
    stdout, stderr, exit_ = _relay(args, proc.logs_stream(follow=args.follow))
    if args.json:
        out(args, {"stdout": stdout, "stderr": stderr, "running": exit_ is None,
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
    out(args, info, lambda: f"sent signal {number} to {info.id} (pid {info.pid})")
    return 0


def cmd_wait(args, client) -> int:
    info = client.get(args.sandbox).process(args.process).wait(timeout=args.timeout or 0)
    out(args, info, lambda: f"{info.id}: {_process_state(info)}")
    return _exit_status(info.exit_code, info.signal)


def cmd_session(args, client) -> int:
    sbx = client.get(args.sandbox)
    if args.session_cmd == "open":
        s = sbx.open_session(args.kind, args.name or "")
        out(args, s.info, lambda: s.name)
    elif args.session_cmd == "ls":
        sessions = sbx.list_sessions()
        out(args, sessions, lambda: table(["NAME", "KIND", "PID"],
                                          [[s.name, s.kind, s.pid] for s in sessions]))
    else:
        sbx.session(args.name).close()
    return 0


def cmd_shell(args, client) -> int:
    """An interactive terminal: our terminal in raw mode, its size followed (SIGWINCH)."""
    import termios
    import tty
    cols, rows = shutil.get_terminal_size()
    shell = client.get(args.sandbox).shell(args.cmd or None, rows=rows, cols=cols)

    def read_stdin():
        fd = sys.stdin.fileno()
        while data := os.read(fd, 4096):
            shell.send(data)

    def on_winch(*_):
        c, r = shutil.get_terminal_size()
        shell.resize(r, c)

    is_tty = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if is_tty else None
    if is_tty:
        tty.setraw(sys.stdin)
        signal.signal(signal.SIGWINCH, on_winch)
    threading.Thread(target=read_stdin, daemon=True).start()
    try:
        with shell:
            for data in shell:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
    return shell.exit.status if shell.exit else 0


def cmd_status(args, client) -> int:
    st = client.status()
    out(args, st, lambda: table(["FIELD", "VALUE"], [
        ["version", st.version], ["state dir", st.state_dir],
        ["store", f"{st.store_backing}, {human(st.store_free_bytes)} free of "
                  f"{human(st.store_size_bytes)}"],
        ["store inodes", f"{st.store_free_inodes:,} free of {st.store_inodes:,}"],
        ["store reserve", f"{human(st.store_reserve_bytes)}, "
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
    out(args, st.operations, lambda: table(
        ["OPERATION", "COUNT", "P50 MS", "P95 MS"],
        [[o.operation, o.count, f"{o.p50_ms:.2f}", f"{o.p95_ms:.2f}"] for o in st.operations]))
    return 0
