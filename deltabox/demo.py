"""`deltabox demo`: a guided tour on a throw-away daemon.

Starts a daemon on a temporary state dir (a loop-backed XFS image), imports
the demo image (debootstrap + python3 + git, built by native/setup-host.sh),
and shows what an agent harness does with it: create, exec, persistent
sessions, files, isolation -- with the latencies measured on this machine.
Everything is removed at the end.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import deltabox

console = Console()


def _pcts(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return 1000 * statistics.median(s), 1000 * s[min(len(s) - 1, int(0.95 * len(s)))]


def _start_daemon(state: Path, image_dirs: tuple[Path, ...] = ()) -> subprocess.Popen:
    """A throw-away daemon on `state`; `image_dirs` replace its default image dirs."""
    sock = state / "deltabox.sock"
    extra = [arg for d in image_dirs for arg in ("--image-dir", str(d))]
    proc = subprocess.Popen([sys.executable, "-m", "deltabox.cli", "daemon", "--state-dir",
                             str(state), "--socket", str(sock), "--store-size", "16G", *extra],
                            stdout=open(state.parent / "daemon.log", "wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon failed: {(state.parent / 'daemon.log').read_text()}")
        if sock.exists():
            try:
                with deltabox.Client(sock) as c:
                    c.status()
                return proc
            except deltabox.DeltaboxError:
                pass
        time.sleep(0.05)
    raise SystemExit("daemon did not start")


def run(image_tar: Path) -> int:
    if os.geteuid() != 0:
        raise SystemExit("the demo runs a daemon, which needs root")
    base = Path(tempfile.mkdtemp(prefix="deltabox-demo-"))
    state = base / "state"
    state.mkdir()
    console.rule("[bold]DeltaBox demo")
    console.print(f"daemon state dir {state} (loop-backed XFS with reflinks)")
    proc = _start_daemon(state)
    try:
        with deltabox.Client(state / "deltabox.sock") as c:
            st = c.status()
            console.print(f"daemon {st.version} up, store {st.store_backing}, CRIU "
                          f"{st.criu_version or 'not installed'}")
            with console.status("importing the demo image"):
                img = c.import_image("demo", image_tar)
            console.print(f"imported image [bold]demo[/]: {img.size_bytes / 2**20:.0f} MiB, "
                          f"{len(img.layer_ids)} layer(s)")
            _tour(c)
            _latencies(c)
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["rm", "-rf", str(base)])
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
        create.append(t1 - t0)
        exec_.append(t2 - t1)
        destroy.append(t3 - t2)
    table = Table("operation (through gRPC)", "p50 ms", "p95 ms", box=None)
    for name, xs in (("create", create), ("exec true", exec_), ("destroy", destroy)):
        p50, p95 = _pcts(xs)
        table.add_row(name, f"{p50:.1f}", f"{p95:.1f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    cache = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))
    return run(cache / "images" / "demo.tar")
