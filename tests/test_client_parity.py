"""The client: the blocking and the asyncio family offer the same operations with the same
parameters; no public call returns a protobuf message; deadlines are per call and an exec
is limited by its own timeout only; idempotent calls wait for a restarting daemon; and the
client imports with grpcio + protobuf alone."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import subprocess
import sys
import threading
import time
import typing

import pytest
from google.protobuf.message import Message

import deltabox
import deltabox.client as client_pkg
from conftest import TINY_TAR
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.client import results
from deltabox.client.operations import OPERATIONS

PAIRS = [(deltabox.Client, deltabox.AsyncClient), (deltabox.Sandbox, deltabox.AsyncSandbox),
         (deltabox.Session, deltabox.AsyncSession), (deltabox.Process, deltabox.AsyncProcess)]


def _public(cls) -> dict:
    return {n: getattr(cls, n) for n in dir(cls)
            if not n.startswith("_") and callable(getattr(cls, n))}


@pytest.mark.parametrize("sync_cls, async_cls", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_sync_and_async_offer_the_same_operations(sync_cls, async_cls):
    sync, aio = _public(sync_cls), _public(async_cls)
    assert set(sync) == set(aio), set(sync) ^ set(aio)
    for name in sync:
        s, a = inspect.signature(sync[name]), inspect.signature(aio[name])
        assert list(s.parameters.values()) == list(a.parameters.values()), name
        want = s.return_annotation
        if isinstance(want, str):  # the asyncio family returns its own handles
            want = re.sub(r"\b(Sandbox|Session|Process|Shell|Iterator)\b", r"Async\1", want)
        assert a.return_annotation == want, name
        op = getattr(aio[name], "operation", None)
        if op is not None and op.shape in ("unary", "fold") and not op.closable:
            assert inspect.iscoroutinefunction(aio[name]), name
        assert not inspect.iscoroutinefunction(sync[name]), name


def test_every_rpc_is_an_operation_of_both_families():
    rpcs = {(svc.name, m.name) for svc in pb.DESCRIPTOR.services_by_name.values()
            for m in svc.methods}
    names = {"Images": "images", "Sandboxes": "sandboxes", "Checkpoints": "checkpoints",
             "System": "system"}
    covered = {(svc, op.rpc) for op in OPERATIONS for svc in names if names[svc] == op.service}
    assert rpcs <= covered, rpcs - covered
    owners = dict(zip(("client", "sandbox", "session", "process"), PAIRS))
    for op in OPERATIONS:
        for cls in owners[op.owner]:
            assert getattr(cls, op.name).operation is op, (cls.__name__, op.name)


def _annotation_types(annotation: str) -> list:
    ns = {**vars(typing), **vars(results), **vars(client_pkg)}
    return _flatten(eval(annotation, ns))  # noqa: S307 - our own annotations


def _flatten(value) -> list:
    """The types an annotation names (list[X] | None -> list, X, NoneType)."""
    out, todo = [], [value]
    while todo:
        t = todo.pop()
        args = typing.get_args(t)
        if args:
            todo.extend(args)
        else:
            out.append(typing.get_origin(t) or t)
    return out


def _is_protobuf(t) -> bool:
    return isinstance(t, type) and issubclass(t, Message)


def test_no_public_annotation_is_a_protobuf_message():
    for pair in PAIRS:
        for cls in pair:
            for name, method in _public(cls).items():
                ann = inspect.signature(method).return_annotation
                if isinstance(ann, str):
                    types = _annotation_types(ann)
                    assert not any(_is_protobuf(t) for t in types), (cls.__name__, name, types)
    for cls in vars(results).values():
        if dataclasses.is_dataclass(cls):
            for field, hint in typing.get_type_hints(cls).items():
                assert not any(_is_protobuf(t) for t in _flatten(hint)), (cls.__name__, field)


def _no_protobuf_inside(value, path="result"):
    """Walk a result: dataclasses, lists, tuples, dicts; fail on any protobuf message."""
    assert not isinstance(value, Message), f"{path} is a protobuf {type(value).__name__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _no_protobuf_inside(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _no_protobuf_inside(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_protobuf_inside(v, f"{path}[{k!r}]")
    elif hasattr(value, "info"):  # a handle
        _no_protobuf_inside(value.info, f"{path}.info")


def test_results_hold_no_protobuf(client, tiny):
    tiny.write_file("/tmp/f", "x")
    ck = tiny.checkpoint("parity")
    proc = tiny.exec(["sleep", "0.2"], detach=True)
    calls = {
        "status": client.status, "stats": client.stats, "list_images": client.list_images,
        "list": client.list, "get": lambda: client.get(tiny.id),
        "refresh": tiny.refresh, "exec": lambda: tiny.exec("echo hi"),
        "exec_stream": lambda: list(tiny.exec_stream("echo hi")),
        "list_dir": lambda: tiny.list_dir("/tmp"), "stat": lambda: tiny.stat("/tmp/f"),
        "checkpoints": tiny.checkpoints, "diff": lambda: tiny.diff(ck),
        "processes": tiny.processes, "wait": lambda: proc.wait(timeout=10),
        "logs": proc.logs, "pin": lambda: client.pin_checkpoint(ck, pinned=False),
        "rollback": lambda: tiny.rollback(ck),
    }
    for name, call in calls.items():
        value = call()
        _no_protobuf_inside(value, name)
    assert tiny.info.state == deltabox.SandboxState.RUNNING == "running"
    assert tiny.stat("/tmp/f").type is deltabox.FileType.REGULAR
    assert ck.mode is deltabox.CheckpointMode.FS
    assert client.diff(ck, tiny.id) == []


def test_async_family_is_complete_and_typed(daemon):
    """The calls the asyncio client used to lack, and both `async with` forms of create."""
    async def go():
        async with deltabox.AsyncClient(daemon.socket) as c:
            async with c.create("tiny") as sbx:             # no `await` needed
                assert isinstance(sbx, deltabox.AsyncSandbox)
                await sbx.mkdir("/tmp/d")
                await sbx.write_file("/tmp/d/f", "hello")
                assert [e.name for e in await sbx.list_dir("/tmp/d")] == ["f"]
                assert (await sbx.stat("/tmp/d/f")).size == 5
                ck = await sbx.checkpoint("a")
                await sbx.remove("/tmp/d", recursive=True)
                assert ("/tmp/d", "deleted") in await sbx.diff(ck)
                assert [x.id for x in await sbx.checkpoints()] == [ck.id]
                async with sbx.open_session("sh", "s") as sh:
                    await sh.run("X=7")
                    assert [s.name for s in await sbx.list_sessions()] == ["s"]
                    assert (await (await sbx.session("s")).run("echo $X")).stdout == b"7\n"
                assert await sbx.list_sessions() == []
                assert (await sbx.refresh()) is sbx
                sid = sbx.id
                events = [ev.kind async for ev in sbx.exec_stream("echo x")]
                assert events[0] == "started" and events[-1] == "exit"
                assert isinstance(await c.stats(), deltabox.client.Stats)
            assert sid not in [s.id for s in await c.list()]
            await c.delete_checkpoint(ck)
            async with await c.create("tiny") as old_form:       # the older form still works
                assert (await old_form.exec(["true"])).ok
    asyncio.run(go())


def test_exec_is_limited_by_its_own_timeout_not_the_client_default(daemon, tiny):
    with deltabox.Client(daemon.socket, timeout=1.0) as c:
        sbx = c.get(tiny.id)
        t0 = time.monotonic()
        r = sbx.exec(["sleep", "2"])                     # longer than the client's default
        assert r.ok and time.monotonic() - t0 >= 2
        r = sbx.exec(["sleep", "5"], timeout=0.5)        # its own timeout governs it
        assert r.timed_out and r.signal == 9
        assert list(sbx.exec_stream(["sleep", "1.5"]))[-1].exit.exit_code == 0
        with sbx.open_session("sh") as sh:
            assert sh.run("sleep 1.5; echo done").stdout == b"done\n"
        with pytest.raises(deltabox.DeadlineExceeded):   # a per-call deadline
            sbx.exec(["sleep", "5"], deadline=0.5)
        assert c.status(deadline=5).version             # and for any call


def test_idempotent_calls_wait_for_a_restarting_daemon(new_daemon):
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
    with deltabox.Client(d.socket, retry=deltabox.Retry(window=60)) as c:
        assert c.status().version
        assert d.stop() == 0
        with pytest.raises(deltabox.Unavailable):       # never retried: it changes state
            c.create("tiny")
        with deltabox.Client(d.socket, retry=None) as no_retry:
            with pytest.raises(deltabox.Unavailable):
                no_retry.status()
        restarted = threading.Timer(1.5, d.start)
        restarted.start()
        t0 = time.monotonic()
        try:
            images = c.list_images()                     # waits for the daemon, then runs
        finally:
            restarted.join()
        assert time.monotonic() - t0 >= 1.5
        assert [i.name for i in images] == ["tiny"]
        assert c.list() == []
    # the window bounds the wait
    assert d.stop() == 0
    with deltabox.Client(d.socket, retry=deltabox.Retry(window=1)) as c:
        t0 = time.monotonic()
        with pytest.raises(deltabox.Unavailable):
            c.status()
        assert 0.9 <= time.monotonic() - t0 < 10


def test_async_idempotent_calls_wait_for_a_restarting_daemon(new_daemon):
    d = new_daemon().start()

    async def go():
        async with deltabox.AsyncClient(d.socket, retry=deltabox.Retry(window=60)) as c:
            assert (await c.status()).version
            assert d.stop() == 0
            with pytest.raises(deltabox.Unavailable):
                await c.create("tiny")
            restarted = threading.Timer(1.5, d.start)
            restarted.start()
            try:
                st = await c.status()
            finally:
                await asyncio.to_thread(restarted.join)
            return st
    assert asyncio.run(go()).version


def test_client_side_checks_raise_invalid_argument(client, tiny):
    with pytest.raises(deltabox.InvalidArgument, match="network"):
        client.create("tiny", network="bridge")
    with pytest.raises(deltabox.InvalidArgument, match="session kind"):
        tiny.open_session("zsh")
    with pytest.raises(deltabox.InvalidArgument, match="not both"):
        deltabox.Client("localhost:1", tls_ca="/x", token="a", token_file="/a")
    with pytest.raises(TypeError):
        tiny.write_file("/tmp/x", 3.5)
    with pytest.raises(TypeError):
        client.import_image("x", 42)
    assert not issubclass(deltabox.InvalidArgument, ValueError)


BLOCKED = ("psutil", "pyroute2", "cffi", "_cffi_backend", "structlog", "prometheus_client",
           "deltabox.host", "deltabox.core", "deltabox.store", "deltabox.server", "rich")

IMPORT_PROBE = f"""
import sys
BLOCKED = {BLOCKED!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {{name}}")
        return None

sys.meta_path.insert(0, Block())
import deltabox, deltabox.client, deltabox.errors, deltabox.types
from deltabox import Client, AsyncClient
assert not [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
print("ok")
"""


def test_the_client_imports_with_grpcio_and_protobuf_only():
    r = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    # ... and the probe does block: importing the daemon fails under it
    r = subprocess.run([sys.executable, "-c", IMPORT_PROBE.replace(
        'print("ok")', "import deltabox.server.app")], capture_output=True, text=True,
        timeout=60)
    assert r.returncode != 0 and "blocked" in r.stderr
