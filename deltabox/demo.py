"""`deltabox demo`: a guided tour on a throw-away daemon.

Starts a daemon on a temporary state dir (`deltabox.testing.ThrowawayDaemon`: a
loop-backed XFS image), imports the demo image (debootstrap + python3 + git, built by
native/setup-host.sh), and shows what an agent harness does with it:

1. the tour: create, exec, persistent sessions, files, isolation, and the latency of
   create / exec / destroy on this machine;
2. time travel, what the project exists for: a full checkpoint of a sandbox whose
   Python session holds a variable, a destructive step (the project deleted, the
   variable overwritten), a rollback that brings files AND the session's variable back,
   a fork into children that each diverge, and the checkpoint tree.

Every time printed is measured around the client call (what the caller waits for,
through gRPC), not the daemon's own accounting. Everything is removed at the end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

import deltabox
from deltabox.stats import percentile
from deltabox.testing import ThrowawayDaemon

console = Console()

CHILDREN = 4
PROJECT = "/work/project"


def run(image_tar: Path) -> int:
    if os.geteuid() != 0:
        raise SystemExit("the demo runs a daemon, which needs root")
    console.rule("[bold]DeltaBox demo")
    with ThrowawayDaemon(image_dirs=(image_tar.parent,)) as daemon:
        console.print(f"daemon state dir {daemon.state_dir} (loop-backed XFS with reflinks)")
        with daemon.client() as c:
            st = c.status()
            console.print(f"daemon {st.version} up, store {st.store_backing}, CRIU "
                          f"{st.criu_version or 'not installed'}")
            with console.status("importing the demo image"):
                img = c.import_image("demo", image_tar)
            console.print(f"imported image [bold]demo[/]: {img.size_bytes / 2**20:.0f} MiB, "
                          f"{len(img.layer_ids)} layer(s)")
            _tour(c)
            _latencies(c)
            if st.criu_version:
                _time_travel(c)
            else:
                console.print("[yellow]CRIU is not installed: full checkpoints (time travel) "
                              "skipped[/]")
    console.rule("[bold green]done: everything cleaned up")
    return 0


def _tour(c: deltabox.Client) -> None:
    console.rule("sandbox")
    with c.create("demo", name="agent", memory=512 << 20, pids=256) as sbx:
        console.print(f"created [bold]{sbx.name}[/] ({sbx.id}), init pid {sbx.info.init_pid} "
                      "on the host")
        r = sbx.exec("uname -n; id -u; python3 --version; git --version")
        console.print(r.stdout.decode().rstrip())
        console.print("[bold]isolation:[/] processes visible inside: "
                      + sbx.exec("ls /proc | grep -c '^[0-9]'").stdout.decode().strip()
                      + "; network interfaces: "
                      + sbx.exec("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | "
                                 "paste -sd,").stdout.decode().strip()
                      + "; mount allowed: "
                      + ("no" if sbx.exec("mount -t tmpfs x /mnt").exit_code else "YES"))

        console.rule("persistent sessions")
        py = sbx.open_session("python")
        py.run("import math, collections\ncounter = collections.Counter('abracadabra')")
        r = py.run("print(counter.most_common(2), math.tau)")
        console.print(f"python session keeps its objects: {r.stdout.decode().strip()}")
        sh = sbx.open_session("bash")
        sh.run("cd /tmp && export STEP=1 && bump() { STEP=$((STEP+1)); }")
        sh.run("bump; bump")
        r = sh.run("echo cwd=$(pwd) STEP=$STEP")
        console.print(f"bash session keeps cwd, variables, functions: {r.stdout.decode().strip()}")

        console.rule("files")
        sbx.write_file("/work/app.py", "print('hello from the agent')\n", make_parents=True)
        console.print("wrote /work/app.py through the API; running it: "
                      + sbx.exec(["python3", "/work/app.py"]).stdout.decode().strip())
        sbx.exec("ln -s / /tmp/escape")
        entries = [e.name for e in sbx.list_dir("/tmp/escape/..")]
        console.print(f"a symlink to / and '..' stay inside the sandbox: {entries[:6]}...")


def _latencies(c: deltabox.Client, n: int = 15) -> None:
    console.rule("latency on this machine")
    create, exec_, destroy = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        sbx = c.create("demo")
        t1 = time.perf_counter()
        sbx.exec(["true"])
        t2 = time.perf_counter()
        sbx.destroy()
        t3 = time.perf_counter()
        create.append(1000 * (t1 - t0))
        exec_.append(1000 * (t2 - t1))
        destroy.append(1000 * (t3 - t2))
    table = Table(f"operation (through gRPC, n={n})", "p50 ms", "p95 ms", box=None)
    for name, xs in (("create", create), ("exec true", exec_), ("destroy", destroy)):
        table.add_row(name, f"{percentile(xs, 50):.1f}", f"{percentile(xs, 95):.1f}")
    console.print(table)


def _timed(fn, *args, **kw):
    """(fn's result, milliseconds the caller waited for it)."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, 1000 * (time.perf_counter() - t0)


def _step(ms: float, what: str) -> None:
    console.print(f"[cyan]{ms:8.1f} ms[/]  {what}")


def _state(sbx, py) -> str:
    """What the agent has: the project's files and the session's variables."""
    r = sbx.exec(f"test -d {PROJECT} && ls {PROJECT} | paste -sd' '")
    files = r.stdout.decode().strip() if r.exit_code == 0 else "(gone)"
    return f"files: {files} | " + py.run("print(f'{plan=} {step=}')").stdout.decode().strip()


def _path_note(path) -> str:
    """The rollback path the daemon took, in words."""
    notes = {"double": "a ready double swapped in",
             "double-waited": "waited for its double",
             "restore": "no double: CRIU restore"}
    return f"[bold]{path}[/]: {notes.get(str(path), '')}"


def _wait_ready(sbx, ckpt_id: str, timeout: float = 30.0) -> None:
    """Until the checkpoint's body double is built (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(ck.id == ckpt_id and ck.ready for ck in sbx.checkpoints()):
            return
        time.sleep(0.05)


def _time_travel(c: deltabox.Client) -> None:
    console.rule("time travel: checkpoint, break, roll back, fork")
    with c.create("demo", name="agent", memory=512 << 20) as sbx:
        sbx.write_file(f"{PROJECT}/calc.py", "def add(a, b):\n    return a + b\n",
                       make_parents=True)
        sbx.write_file(f"{PROJECT}/README.md", "# calc\n")
        py = sbx.open_session("python", name="agent")
        py.run("plan = ['read', 'fix', 'test']; step = 2")
        console.print(f"           start: {_state(sbx, py)}")

        ck, ms = _timed(sbx.checkpoint, "before the mistake", full=True)
        _step(ms, f"full checkpoint {ck.id}: files + processes, the session too")
        _, ms = _timed(sbx.exec, f"rm -rf {PROJECT}")
        _step(ms, f"the agent runs `rm -rf {PROJECT}`")
        _, ms = _timed(py.run, "plan = None; step = -1")
        _step(ms, "... and overwrites its session's variables")
        console.print(f"           now:  {_state(sbx, py)}")

        rb, ms = _timed(sbx.rollback, ck)
        _step(ms, f"rollback at once ({_path_note(rb.path)})")
        console.print(f"           back: {_state(sbx, py)}")

        _, ms = _timed(_wait_ready, sbx, ck.id)
        _step(ms, "the agent thinks; meanwhile the daemon rebuilds the body double")
        sbx.exec(f"rm -rf {PROJECT}")
        py.run("plan = None")
        rb, ms = _timed(sbx.rollback, ck)
        _step(ms, f"same mistake again, rollback ({_path_note(rb.path)})")
        console.print(f"           back: {_state(sbx, py)}")

        kids, ms = _timed(c.fork, ck, CHILDREN)
        _step(ms, f"fork into {CHILDREN} children (cold: each restored, files + session)")
        _diverge(kids)
        _show_tree(sbx, kids)
        for kid in kids:
            if kid.sandbox is not None:
                kid.sandbox.destroy()


def _diverge(kids) -> None:
    """Each child tries a different fix, in its own files and its own copy of the session."""
    fixes = ["return a + b  # unchanged", "return sum((a, b))", "return b + a",
             "return a - (-b)"]
    table = Table("child", "its edit", "its session", "checkpoint ms", box=None)
    for i, kid in enumerate(kids):
        if kid.error is not None:
            table.add_row(f"#{i}", f"[red]fork failed: {kid.error}[/]", "", "")
            continue
        sbx = kid.sandbox
        py = sbx.session("agent")
        sbx.exec(["sed", "-i", f"s/return a + b/{fixes[i % len(fixes)]}/", f"{PROJECT}/calc.py"])
        py.run(f"step = {3 + i}; plan.append('try fix #{i}')")
        _, ms = _timed(sbx.checkpoint, f"child {i}: fix #{i}", full=True)
        edit = sbx.exec(f"grep return {PROJECT}/calc.py").stdout.decode().strip()
        step = py.run("print(f'step={step}, {len(plan)} in plan')").stdout.decode().strip()
        table.add_row(f"#{i} {sbx.name}", edit, step, f"{ms:.1f}")
    console.print(table)


def _show_tree(root, kids) -> None:
    """The checkpoint tree of the root and its children, merged by checkpoint id."""
    sandboxes = [root] + [k.sandbox for k in kids if k.sandbox is not None]
    names = {s.id: s.name for s in sandboxes}
    nodes = {ck.id: ck for s in sandboxes for ck in s.checkpoints()}
    children: dict[str, list] = {}
    for ck in sorted(nodes.values(), key=lambda ck: ck.created_at):
        children.setdefault(ck.parent_id if ck.parent_id in nodes else "", []).append(ck)
    tree = Tree("[bold]checkpoint tree[/]")

    def add(branch, parent_id: str) -> None:
        for ck in children.get(parent_id, []):
            owner = names.get(ck.sandbox_id, ck.sandbox_id)
            add(branch.add(f"{ck.id} {ck.label!r} (of {owner})"), ck.id)
    add(tree, "")
    console.print(tree)


def main(argv: list[str] | None = None) -> int:
    cache = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))
    return run(cache / "images" / "demo.tar")
