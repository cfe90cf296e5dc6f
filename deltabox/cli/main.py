"""The `deltabox` command line: its arguments, and `main`.

The commands live by area -- `sandboxes.py` (images, sandboxes, exec, processes, sessions,
shell, status), `checkpoints.py` (snapshot, restore, fork, warm, tree, diff), the daemon's
own flags in `deltabox.server.config_args` -- and print through `output.py`. Every client
command reaches the daemon through one `deltabox.Client`: the unix socket (--socket), or a
TCP daemon (--address HOST:PORT --tls-ca FILE, its token from --token-file or
$DELTABOX_TOKEN; never from the command line, which any host user can read).
"""

from __future__ import annotations

import argparse
import sys

from deltabox.cli.checkpoints import (cmd_checkpoint, cmd_diff, cmd_export, cmd_fork,
                                      cmd_import, cmd_restore, cmd_snapshot, cmd_tree, cmd_warm)
from deltabox.cli.output import parse_size
from deltabox.cli.sandboxes import (cmd_create, cmd_exec, cmd_image_import, cmd_image_ls,
                                    cmd_image_rm, cmd_kill, cmd_logs, cmd_ls, cmd_ps, cmd_rm,
                                    cmd_session, cmd_shell, cmd_stats, cmd_status, cmd_wait)
from deltabox.errors import DeltaboxError
from deltabox.types import NetworkMode, SessionKind

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltabox", description="DeltaBox sandboxes with "
                                "millisecond checkpoint, rollback and fork")
    p.add_argument("--socket", help="daemon socket (default $DELTABOX_SOCKET, else "
                   "/run/deltabox/deltabox.sock), or HOST:PORT of a daemon on TCP")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="a daemon listening on TCP (with --tls-ca and --token-file or "
                   "$DELTABOX_TOKEN); instead of --socket")
    p.add_argument("--tls-ca", metavar="PATH", help="the TCP daemon's certificate or its CA")
    p.add_argument("--token-file", metavar="PATH",
                   help="the TCP daemon's bearer token, in a chmod-600 file (or DELTABOX_TOKEN)")
    # Refused (it would show in /proc/<pid>/cmdline); also keeps `--token` from being
    # taken as an abbreviation of --token-file.
    p.add_argument("--token", dest="client_token", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)

    from deltabox.server.config_args import add_daemon_parser
    add_daemon_parser(sub)  # the daemon's flags: one per deltabox.config setting

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
    c.add_argument("--memory", type=parse_size, help="memory limit, e.g. 512M")
    c.add_argument("--pids", type=int, help="max number of processes")
    c.add_argument("--cpus", type=float, help="cpu quota in cores")
    c.add_argument("--network", choices=[m.value for m in NetworkMode], default="none")
    c.add_argument("--env", action="append", metavar="NAME=VALUE")
    c.add_argument("--hostname")
    c.add_argument("--disk", type=parse_size,
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
    so.add_argument("--kind", choices=[k.value for k in SessionKind], default="bash")
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
    bt = bsub.add_parser("tree", help="DeltaCR as tree search uses it: rollback to a random "
                         "one of the last 8 checkpoints, step, checkpoint; path mix vs plain CRIU")
    bt.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="a JSON document on stdout (progress on stderr)")
    bt.add_argument("--quick", action="store_true", help="fewer steps (about 2 min)")
    bt.add_argument("--iterations", type=int, help="steps per sandbox, pairs and baselines")
    bt.add_argument("--sandboxes", help="comma-separated sandbox counts (default 1,4)")
    bt.add_argument("--think-ms", type=int, default=300,
                    help="pause between a rollback and the step (the model's think time)")
    bt.add_argument("--hot-checkpoints", type=int, help="the daemon's --hot-checkpoints")
    bt.add_argument("--hottest-pool", type=int, help="the daemon's --hottest-pool")
    bt.add_argument("--busy", type=int, default=0, metavar="N",
                    help="the busy mode: rollbacks to 8 hot checkpoints with N other sandboxes "
                    "idle, then busy (exec, checkpoints, rollbacks); p50/p95/p99 and the floor")
    bt.add_argument("--busy-gap-ms", type=int, default=50,
                    help="the busy load's mean pause between two calls of one sandbox")
    bt.set_defaults(func=lambda args: __import__("deltabox.bench").bench.main_tree(args),
                    needs_client=False)
    br = bsub.add_parser("rl", help="DeltaCR as an RL rollout uses it: exec + full checkpoint "
                         "per step, a share of steps roll back; CPU per step vs plain CRIU")
    br.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="a JSON document on stdout (progress on stderr)")
    br.add_argument("--quick", action="store_true", help="1 and 4 sandboxes, 15 steps")
    br.add_argument("--iterations", type=int, help="steps per sandbox (default 30)")
    br.add_argument("--sandboxes", help="comma-separated sandbox counts (default 1,32)")
    br.add_argument("--rollback-rate", type=float, default=0.2,
                    help="share of steps that roll back (default 0.2)")
    br.add_argument("--recent", type=int, default=4,
                    help="roll back to a random one of the last N checkpoints (default 4)")
    br.add_argument("--mb", type=int, default=10, help="MB the Python session holds")
    br.add_argument("--image", choices=("demo", "tiny"), default="demo",
                    help="demo (a Python session holding --mb MB) or tiny (a shell)")
    br.add_argument("--policies", help="the daemon's double-policy values to compare, each "
                    "on its own daemon (default adaptive,always)")
    br.set_defaults(func=lambda args: __import__("deltabox.bench.rl").bench.rl.main_rl(args),
                    needs_client=False)
    by = bsub.add_parser("ray", help="deltabox.ray: per-call overhead of the pool vs the "
                         "plain client, and N sandboxes over a Ray cluster's nodes")
    by.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    by.add_argument("--quick", action="store_true", help="32 sandboxes, 50 iterations")
    by.add_argument("--sandboxes", type=int, help="sandboxes over the nodes (default 256)")
    by.add_argument("--iterations", type=int, help="per-call samples per way (default 300)")
    by.add_argument("--nodes", type=int, default=2, help="local cluster nodes (default 2)")
    by.add_argument("--fork-iterations", type=int, help="forks per kind (default 20)")
    by.add_argument("--concurrency", type=int, default=8, help="calls in flight (default 8)")
    by.add_argument("--address", help="a running Ray cluster whose NodeDaemons are up "
                    "(default: a local cluster on this machine)")
    by.set_defaults(func=lambda args: __import__("deltabox.bench.ray").bench.ray.main_ray(args),
                    needs_client=False)
    bb = bsub.add_parser("batch", help="CheckpointMany/RollbackMany/ExecMany vs N single "
                         "calls, sequential and concurrent")
    bb.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    bb.add_argument("--quick", action="store_true", help="3 rounds")
    bb.add_argument("-n", type=int, default=64, help="sandboxes (default 64)")
    bb.add_argument("--rounds", type=int, help="rounds (default 10, quick 3)")
    bb.add_argument("--concurrency", type=int, default=0,
                    help="the batch's concurrency in the daemon (default: the daemon's, 16)")
    bb.set_defaults(func=lambda args: __import__("deltabox.bench.batch").bench.batch
                    .main_batch(args), needs_client=False)
    bx = bsub.add_parser("transfer", help="export/import of a 100 MB full checkpoint "
                         "between two daemons (MB/s) vs tar | tar and rsync -a")
    bx.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    bx.add_argument("--quick", action="store_true", help="20 MB, 3 iterations")
    bx.add_argument("--mb", type=int, default=100, help="MB the Python session holds")
    bx.add_argument("--iterations", type=int, help="samples per row (default 5)")
    bx.set_defaults(func=lambda args: __import__("deltabox.bench.transfer").bench.transfer
                    .main_transfer(args), needs_client=False)

    bnb = bsub.add_parser("nonblocking", help="Checkpoint(FULL) reply time with and without "
                          "background (and until WaitCheckpoint), default and --durable")
    bnb.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    bnb.add_argument("--iterations", type=int, help="checkpoints each way (default 30)")
    bnb.add_argument("--mb", type=int, default=8, help="MB the Python session holds")
    bnb.add_argument("--files", type=int, default=200, help="files of the project tree")
    bnb.set_defaults(func=lambda args: __import__("deltabox.bench.nonblocking").bench
                     .nonblocking.main_nonblocking(args), needs_client=False)

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
    sn.add_argument("--background", action="store_true",
                    help="return once the cut is taken; the daemon records it afterwards "
                    "(pending, not durable until then: `deltabox checkpoint wait ID`)")
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
    ck = sub.add_parser("checkpoint", help="delete, pin or wait for checkpoints").add_subparsers(
        dest="checkpoint_cmd", required=True)
    ckr = ck.add_parser("rm", help="delete checkpoints (layers are freed when unused)")
    ckr.add_argument("checkpoints", nargs="+")
    ckr.add_argument("--cascade", action="store_true", help="also delete descendants")
    ckp = ck.add_parser("pin", help="pin (or --unpin) a checkpoint")
    ckp.add_argument("checkpoint")
    ckp.add_argument("--unpin", action="store_true")
    ckw = ck.add_parser("wait", help="wait until a background checkpoint is recorded")
    ckw.add_argument("checkpoint")
    for x in (ckr, ckp, ckw):
        x.set_defaults(func=cmd_checkpoint)
    ex = sub.add_parser("export", help="write a checkpoint as a stream another daemon imports")
    ex.add_argument("checkpoint")
    ex.add_argument("-o", metavar="FILE", help="the file to write, or - for stdout")
    ex.set_defaults(func=cmd_export)
    im = sub.add_parser("import", help="import an exported checkpoint (FILE, or - for stdin)")
    im.add_argument("file", nargs="?", help="default: stdin")
    im.set_defaults(func=cmd_import)
    return p



def _target(args) -> str | None:
    if args.address and args.socket:
        raise SystemExit("deltabox: give --socket or --address, not both")
    if args.address:
        host, sep, port = args.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SystemExit(f"deltabox: --address expects HOST:PORT, not {args.address!r}")
        return args.address
    return args.socket


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
        client = Client(_target(args), tls_ca=args.tls_ca, token_file=args.token_file)
    except (DeltaboxError, OSError) as e:
        print(f"deltabox: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2
    try:
        with client:
            return args.func(args, client)
    except DeltaboxError as e:
        print(f"deltabox: {type(e).__name__}: {e.message}", file=sys.stderr)
        return 1
