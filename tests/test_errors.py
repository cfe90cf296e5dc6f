"""Bad requests get clear gRPC errors: the right status code, a message naming the
offending thing, no side effects -- checked with the typed client and with raw stubs
(so the client cannot hide or invent a code). Plus the API surface around it: checkpoint
RPCs answer UNIMPLEMENTED, gRPC health and reflection work, oversized messages are
refused by gRPC without hurting the daemon.
"""

from __future__ import annotations

import math
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import deltabox
from conftest import DEMO_TAR, TINY_TAR, no_new_cgroups, sandbox_cgroups
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc

UNKNOWN = "no-such-sandbox-4242"
MiB = 1 << 20
DAEMON_LIMIT = 80 * MiB  # Config.max_message_bytes


@pytest.fixture(scope="module")
def channel(daemon):
    """A raw channel that lets us send more than the daemon accepts."""
    ch = grpc.insecure_channel(f"unix:{daemon.socket}", options=[
        ("grpc.max_send_message_length", 200 * MiB),
        ("grpc.max_receive_message_length", 200 * MiB)])
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stubs(channel):
    class S:
        images = pb_grpc.ImagesStub(channel)
        sandboxes = pb_grpc.SandboxesStub(channel)
        checkpoints = pb_grpc.CheckpointsStub(channel)
        system = pb_grpc.SystemStub(channel)
    return S


def rpc_error(call) -> grpc.RpcError:
    """Run `call()` (draining a stream) and return the RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as exc:
        res = call()
        if hasattr(res, "__iter__") and not hasattr(res, "SerializeToString"):
            list(res)
    return exc.value


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, *mentions: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    details = err.details() or ""
    assert details.strip(), f"empty message for {code}"
    for m in mentions:
        assert m.lower() in details.lower(), f"{m!r} not in {details!r}"


def rpc_count(client, method: str) -> int:
    """How many calls of `method` the daemon has seen (any status), from its metrics."""
    text = client.stats().prometheus_text
    return int(sum(float(v) for v in re.findall(
        rf'^deltabox_rpc_seconds_count{{[^}}]*method="{method}"[^}}]*}} (\S+)$', text, re.M)))


# ---- unknown objects -----------------------------------------------------------------------

def _shell(s, sandbox):
    return s.Shell(iter([pb.ShellInput(start=pb.ShellStart(sandbox=sandbox, argv=["true"]))]))


SANDBOX_RPCS = {
    "GetSandbox": lambda s, x: s.GetSandbox(pb.GetSandboxRequest(sandbox=x)),
    "DestroySandbox": lambda s, x: s.DestroySandbox(pb.DestroySandboxRequest(sandbox=x)),
    "Exec": lambda s, x: s.Exec(pb.ExecRequest(sandbox=x, argv=["true"])),
    "Exec(shell)": lambda s, x: s.Exec(pb.ExecRequest(sandbox=x, shell="true")),
    "OpenSession": lambda s, x: s.OpenSession(pb.OpenSessionRequest(sandbox=x)),
    "RunInSession": lambda s, x: s.RunInSession(pb.RunInSessionRequest(
        sandbox=x, session="s1", code="true")),
    "ListSessions": lambda s, x: s.ListSessions(pb.ListSessionsRequest(sandbox=x)),
    "CloseSession": lambda s, x: s.CloseSession(pb.CloseSessionRequest(sandbox=x, session="s1")),
    "Shell": _shell,
    "ReadFile": lambda s, x: s.ReadFile(pb.ReadFileRequest(sandbox=x, path="/etc/hostname")),
    "WriteFile": lambda s, x: s.WriteFile(pb.WriteFileRequest(sandbox=x, path="/tmp/x",
                                                              data=b"x")),
    "ListDir": lambda s, x: s.ListDir(pb.ListDirRequest(sandbox=x, path="/")),
    "StatPath": lambda s, x: s.StatPath(pb.StatPathRequest(sandbox=x, path="/")),
    "RemovePath": lambda s, x: s.RemovePath(pb.RemovePathRequest(sandbox=x, path="/tmp/x")),
    "MakeDir": lambda s, x: s.MakeDir(pb.MakeDirRequest(sandbox=x, path="/tmp/d")),
}


@pytest.mark.parametrize("rpc", sorted(SANDBOX_RPCS))
def test_unknown_sandbox_is_not_found_raw(stubs, rpc):
    err = rpc_error(lambda: SANDBOX_RPCS[rpc](stubs.sandboxes, UNKNOWN))
    assert_status(err, grpc.StatusCode.NOT_FOUND, UNKNOWN)


@pytest.mark.parametrize("rpc", sorted(SANDBOX_RPCS))
def test_empty_sandbox_ref_is_invalid_raw(stubs, rpc):
    err = rpc_error(lambda: SANDBOX_RPCS[rpc](stubs.sandboxes, ""))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "sandbox")


def test_unknown_sandbox_is_not_found_client(client):
    with pytest.raises(deltabox.NotFound, match=UNKNOWN):
        client.get(UNKNOWN)
    ghost = deltabox.Sandbox(client, deltabox.SandboxInfo(id=UNKNOWN))
    calls = {
        "destroy": ghost.destroy, "exec": lambda: ghost.exec(["true"]),
        "exec_stream": lambda: list(ghost.exec_stream("true")),
        "open_session": lambda: ghost.open_session("sh"), "list_sessions": ghost.list_sessions,
        "session": lambda: ghost.session("s1"),
        "read_file": lambda: ghost.read_file("/etc/hostname"),
        "write_file": lambda: ghost.write_file("/tmp/x", b"x"), "list_dir": ghost.list_dir,
        "stat": lambda: ghost.stat("/"), "remove": lambda: ghost.remove("/tmp/x"),
        "mkdir": lambda: ghost.mkdir("/tmp/d"), "refresh": ghost.refresh,
    }
    for what, call in calls.items():
        with pytest.raises(deltabox.NotFound) as exc:
            call()
        assert UNKNOWN in exc.value.message, (what, exc.value.message)
        assert exc.value.code == "NOT_FOUND"



def test_not_found_names_what_is_missing(client, tiny):
    """A caller can tell a missing sandbox from a missing checkpoint, image, session or path:
    the daemon names the domain class and the client raises that very class (still a
    NotFound, with the NOT_FOUND code)."""
    cases = [
        (deltabox.SandboxNotFound, lambda: client.get(UNKNOWN)),
        (deltabox.CheckpointNotFound, lambda: tiny.rollback("ckpt-0000000000000000")),
        (deltabox.CheckpointNotFound, lambda: client.fork("ckpt-0000000000000000", 1)),
        (deltabox.ImageNotFound, lambda: client.create("no-such-image")),
        (deltabox.ImageNotFound, lambda: client.remove_image("no-such-image")),
        (deltabox.SessionNotFound, lambda: tiny.session("ghost-session").run("true")),
        (deltabox.PathNotFound, lambda: tiny.read_file("/no/such/file")),
    ]
    for cls, call in cases:
        with pytest.raises(deltabox.NotFound) as exc:
            call()
        assert type(exc.value) is cls, (cls.__name__, type(exc.value).__name__, exc.value.message)
        assert exc.value.code == "NOT_FOUND"
    others = [c for c, _ in cases]
    assert len({c.__name__ for c in others}) == 5 and all(issubclass(c, deltabox.NotFound)
                                                          for c in others)

def test_unknown_session_is_not_found(tiny, stubs):
    for call in (lambda: stubs.sandboxes.RunInSession(pb.RunInSessionRequest(
                     sandbox=tiny.id, session="ghost-session", code="true")),
                 lambda: stubs.sandboxes.CloseSession(pb.CloseSessionRequest(
                     sandbox=tiny.id, session="ghost-session"))):
        assert_status(rpc_error(call), grpc.StatusCode.NOT_FOUND, "ghost-session")
    with pytest.raises(deltabox.NotFound, match="ghost-session"):
        tiny.session("ghost-session")


def test_unknown_image(client, stubs):
    before = {s.id for s in client.list()}
    cgroups = sandbox_cgroups()
    with pytest.raises(deltabox.NotFound, match="no-such-image"):
        client.create("no-such-image")
    err = rpc_error(lambda: stubs.sandboxes.CreateSandbox(
        pb.CreateSandboxRequest(image="no-such-image", name="orphan")))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "no-such-image")
    assert {s.id for s in client.list()} == before, "a failed create left a record"
    assert no_new_cgroups(cgroups), "a failed create left a cgroup"
    err = rpc_error(lambda: stubs.sandboxes.CreateSandbox(pb.CreateSandboxRequest()))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "image")
    with pytest.raises(deltabox.NotFound, match="no-such-image"):
        client.remove_image("no-such-image")
    err = rpc_error(lambda: stubs.images.ImportImage(pb.ImportImageRequest(name="x")))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "source")


# ---- invalid arguments on create -----------------------------------------------------------

@pytest.mark.parametrize("name", ["UPPER", "a/b", "../x", "x" * 200, "-lead", "a b", "é",
                                  "a\0b"])
def test_invalid_sandbox_names(client, stubs, name):
    before = {s.id for s in client.list()}
    with pytest.raises(deltabox.InvalidArgument) as exc:
        client.create("tiny", name=name)
    assert repr(name) in exc.value.message
    err = rpc_error(lambda: stubs.sandboxes.CreateSandbox(
        pb.CreateSandboxRequest(image="tiny", name=name)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, repr(name))
    assert {s.id for s in client.list()} == before


def test_empty_name_is_generated_and_taken_name_is_refused(client):
    """`name` is optional (the proto): '' gets a generated, valid name."""
    with client.create("tiny", name="") as sbx:
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", sbx.name), sbx.name
        with pytest.raises(deltabox.AlreadyExists, match=re.escape(sbx.name)):
            client.create("tiny", name=sbx.name)


def test_a_name_cannot_take_the_form_of_an_id(client, tiny):
    """A lookup takes an id or a name: a sandbox named like another's id made
    `destroy <id>` (twice: a retry) destroy the victim and then the impostor."""
    before = {s.id for s in client.list()}
    for name in (tiny.id, "sbx-0123456789ab", "ck-0123456789ab", "br-0123456789ab"):
        with pytest.raises(deltabox.InvalidArgument, match="form of an id"):
            client.create("tiny", name=name)
    assert {s.id for s in client.list()} == before
    assert client.get(tiny.id).id == tiny.id
    with client.create("tiny", name="sbx-notanid") as sbx:  # the rule is the id's shape only
        assert sbx.name == "sbx-notanid"


def test_a_cancelled_image_import_leaves_no_image(client, stubs):
    """A caller that cancels ImportImage gets CANCELLED, and the import stops: the image
    used to appear 2 s later anyway (and `replace` would have replaced the old one)."""
    if not DEMO_TAR.exists():
        pytest.skip("needs the demo image's tar (large enough to cancel mid-import)")
    call = stubs.images.ImportImage(pb.ImportImageRequest(
        name="cancelled-import", source=str(DEMO_TAR)), timeout=120)
    next(call)  # under way
    call.cancel()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert "cancelled-import" not in {i.name for i in client.list_images()}
        time.sleep(0.25)


def test_invalid_hostname(client):
    with pytest.raises(deltabox.InvalidArgument, match="Bad_Host!"):
        client.create("tiny", hostname="Bad_Host!")


@pytest.mark.parametrize("limits,mention", [
    ({"memory": -1}, "limit"), ({"pids": -1}, "limit"), ({"cpus": -0.5}, "limit"),
    ({"memory": 1 * MiB}, "memory"),
    ({"cpus": math.nan}, "cpu"), ({"cpus": math.inf}, "cpu"),
], ids=["memory-negative", "pids-negative", "cpus-negative", "memory-1MiB", "cpus-nan",
        "cpus-inf"])
def test_invalid_limits(client, stubs, limits, mention):
    before = {s.id for s in client.list()}
    cgroups = sandbox_cgroups()
    try:
        with pytest.raises(deltabox.InvalidArgument) as exc:
            client.create("tiny", **limits)
        assert mention in exc.value.message.lower()
        raw = pb.Limits(memory_bytes=limits.get("memory", 0), pids=limits.get("pids", 0),
                        cpus=limits.get("cpus", 0.0))
        err = rpc_error(lambda: stubs.sandboxes.CreateSandbox(
            pb.CreateSandboxRequest(image="tiny", limits=raw)))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, mention)
        assert {s.id for s in client.list()} == before
        assert no_new_cgroups(cgroups), "a failed create left a cgroup"
    finally:  # a sandbox wrongly accepted must not outlive the test
        for s in client.list():
            if s.id not in before:
                s.destroy()


def test_unknown_network_enum(client, stubs):
    before = {s.id for s in client.list()}
    err = rpc_error(lambda: stubs.sandboxes.CreateSandbox(
        pb.CreateSandboxRequest(image="tiny", network=99)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "network")
    assert {s.id for s in client.list()} == before
    with pytest.raises(deltabox.InvalidArgument, match="network"):
        client.create("tiny", network="bogus")


@pytest.mark.parametrize("env,mention", [
    ({"A=B": "x"}, "A=B"), ({"": "x"}, "environment"), ({"A\0B": "x"}, "environment"),
    ({"GOOD": "x\0y"}, "GOOD"),
])
def test_invalid_env_on_create_and_exec(client, tiny, stubs, env, mention):
    before = {s.id for s in client.list()}
    with pytest.raises(deltabox.InvalidArgument) as exc:
        client.create("tiny", env=env)
    assert mention in exc.value.message
    assert {s.id for s in client.list()} == before
    err = rpc_error(lambda: stubs.sandboxes.Exec(pb.ExecRequest(sandbox=tiny.id,
                                                                argv=["true"], env=env)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, mention)
    err = rpc_error(lambda: stubs.sandboxes.OpenSession(pb.OpenSessionRequest(
        sandbox=tiny.id, kind=pb.SESSION_KIND_SH, env=env)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, mention)
    assert tiny.list_sessions() == []


# ---- invalid exec / session requests -------------------------------------------------------

def test_exec_argv_errors(tiny, stubs):
    for argv in ([], [""]):
        with pytest.raises(deltabox.InvalidArgument, match="argv"):
            tiny.exec(argv)
        err = rpc_error(lambda: stubs.sandboxes.Exec(pb.ExecRequest(sandbox=tiny.id,
                                                                    argv=argv)))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "argv")
    err = rpc_error(lambda: stubs.sandboxes.Exec(pb.ExecRequest(
        sandbox=tiny.id, argv=["echo", "a"], shell="echo b")))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "argv", "shell")
    with pytest.raises(deltabox.InvalidArgument, match="NUL"):
        tiny.exec(["echo", "a\0b"])
    with pytest.raises(deltabox.InvalidArgument, match="NUL"):
        tiny.exec(["true"], cwd="/tmp\0x")
    err = rpc_error(lambda: stubs.sandboxes.Exec(pb.ExecRequest(sandbox=tiny.id, argv=["true"],
                                                                timeout_seconds=-1)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "timeout")
    err = rpc_error(lambda: stubs.sandboxes.Exec(pb.ExecRequest(sandbox=tiny.id, argv=["true"],
                                                                max_output_bytes=-5)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "max_output")
    # none of it left a process behind
    assert tiny.exec("ps -o comm | grep -c echo || true").stdout.strip() == b"0"


def test_session_kind_and_name_errors(tiny, stubs):
    err = rpc_error(lambda: stubs.sandboxes.OpenSession(pb.OpenSessionRequest(
        sandbox=tiny.id, kind=99)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "kind", "99")
    err = rpc_error(lambda: stubs.sandboxes.OpenSession(pb.OpenSessionRequest(
        sandbox=tiny.id, kind=pb.SESSION_KIND_SH, name="Bad/Name")))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "Bad/Name")
    assert tiny.list_sessions() == []


def test_shell_first_message_must_be_start(tiny, stubs):
    err = rpc_error(lambda: stubs.sandboxes.Shell(iter([pb.ShellInput(stdin=b"ls\n")])))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "start")


def test_shell_without_any_message(stubs):
    """A client that opens Shell and closes its side at once sent a malformed request."""
    err = rpc_error(lambda: stubs.sandboxes.Shell(iter([])))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "start")


def test_file_path_errors(tiny):
    with pytest.raises(deltabox.NotFound, match="/no/such/file"):
        tiny.read_file("/no/such/file")
    with pytest.raises(deltabox.InvalidArgument, match="/etc"):
        tiny.read_file("/etc")
    with pytest.raises(deltabox.InvalidArgument, match="path"):
        tiny.read_file("")
    with pytest.raises(deltabox.InvalidArgument):
        tiny.read_file("/etc/\0passwd")
    with pytest.raises(deltabox.InvalidArgument, match="offset"):
        tiny.read_file("/etc/passwd", offset=-1)


# ---- payload limits ------------------------------------------------------------------------

def test_oversized_messages_are_refused_and_daemon_stays_healthy(client, tiny, stubs):
    # within the limit: a 64 MiB write goes through
    assert tiny.write_file("/tmp/big-ok", b"a" * (64 * MiB)) == 64 * MiB
    assert tiny.stat("/tmp/big-ok").size == 64 * MiB
    tiny.remove("/tmp/big-ok")
    too_big = b"b" * (DAEMON_LIMIT + MiB)
    # the daemon's gRPC server refuses it (our raw channel would send up to 200 MiB)
    err = rpc_error(lambda: stubs.sandboxes.WriteFile(pb.WriteFileRequest(
        sandbox=tiny.id, path="/tmp/big", data=too_big)))
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED)
    err = rpc_error(lambda: stubs.sandboxes.Exec(pb.ExecRequest(
        sandbox=tiny.id, argv=["cat"], stdin=too_big)))
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED)
    # the typed client stops it before sending (same limit)
    with pytest.raises(deltabox.ResourceExhausted):
        tiny.write_file("/tmp/big", too_big)
    del too_big
    # nothing was written, and the daemon and the sandbox carry on
    with pytest.raises(deltabox.NotFound):
        tiny.stat("/tmp/big")
    assert client.status().sandboxes >= 1
    assert tiny.exec(["echo", "alive"]).stdout == b"alive\n"
    with client.create("tiny") as other:
        assert other.exec("echo fresh").stdout == b"fresh\n"


# ---- the client's own checks ---------------------------------------------------------------

def test_wrong_types_raise_type_error_before_sending(client, tiny):
    cases = {
        "CreateSandbox": [lambda: client.create(123), lambda: client.create("tiny", name=5),
                          lambda: client.create("tiny", memory="1G"),
                          lambda: client.create("tiny", env={"A": 1}),
                          lambda: client.create("tiny", hostname=7)],
        "GetSandbox": [lambda: client.get(5)],
        "Exec": [lambda: tiny.exec([1, 2]), lambda: tiny.exec(["true"], env={"A": 1}),
                 lambda: tiny.exec(["true"], cwd=5), lambda: tiny.exec(["cat"], stdin=5),
                 lambda: tiny.exec(["true"], timeout="1")],
        "WriteFile": [lambda: tiny.write_file("/tmp/x", 123),
                      lambda: tiny.write_file(5, b"x")],
        "ReadFile": [lambda: tiny.read_file(5), lambda: tiny.read_file("/x", offset="1")],
        "ImportImage": [lambda: client.import_image(5, TINY_TAR),
                        lambda: client.import_image("x", 5)],
        "RemoveImage": [lambda: client.remove_image(5)],
    }
    seen = {m: rpc_count(client, m) for m in cases}
    for method, calls in cases.items():
        for call in calls:
            with pytest.raises(TypeError):
                call()
    assert {m: rpc_count(client, m) for m in cases} == seen, "a call reached the daemon"


def test_client_rejects_unknown_choices_with_invalid_argument(tiny):
    """`network` and session `kind` are words of deltabox.types; a wrong one is refused by
    the client itself with InvalidArgument (as the daemon would) naming the choices, and a
    wrong type stays a TypeError."""
    with pytest.raises(deltabox.InvalidArgument, match="network"):
        tiny._client.create("tiny", network="bridge")
    with pytest.raises(TypeError, match="data"):
        tiny.write_file("/tmp/x", 42)
    with pytest.raises(deltabox.InvalidArgument, match="fish"):
        tiny.open_session("fish")


# ---- checkpoints, health, reflection -------------------------------------------------------

NO_CP = "cp-nosuch-4242"
CHECKPOINT_RPCS = {
    "Checkpoint": (lambda s: s.Checkpoint(pb.CheckpointRequest(sandbox=UNKNOWN, label="l")),
                   UNKNOWN),
    "Rollback": (lambda s: s.Rollback(pb.RollbackRequest(sandbox=UNKNOWN, checkpoint=NO_CP)),
                 (UNKNOWN, NO_CP)),
    "Fork": (lambda s: s.Fork(pb.ForkRequest(checkpoint=NO_CP, n=2)), NO_CP),
    "ListCheckpoints": (lambda s: s.ListCheckpoints(pb.ListCheckpointsRequest(sandbox=UNKNOWN)),
                        UNKNOWN),
    "Diff": (lambda s: s.Diff(pb.DiffRequest(**{"from": NO_CP, "to": UNKNOWN})),
             (UNKNOWN, NO_CP)),
    "DeleteCheckpoint": (lambda s: s.DeleteCheckpoint(pb.DeleteCheckpointRequest(
        checkpoint=NO_CP)), NO_CP),
    "PinCheckpoint": (lambda s: s.PinCheckpoint(pb.PinCheckpointRequest(checkpoint=NO_CP,
                                                                        pinned=True)), NO_CP),
    "Warm": (lambda s: s.Warm(pb.WarmRequest(checkpoint=NO_CP, n=1)), NO_CP),
    "CheckpointManifest": (lambda s: s.CheckpointManifest(pb.CheckpointManifestRequest(
        checkpoint=NO_CP)), NO_CP),
    "ExportCheckpoint": (lambda s: list(s.ExportCheckpoint(pb.ExportCheckpointRequest(
        checkpoint=NO_CP))), NO_CP),
    "WaitCheckpoint": (lambda s: s.WaitCheckpoint(pb.WaitCheckpointRequest(checkpoint=NO_CP)),
                       NO_CP),
}


@pytest.mark.parametrize("rpc", sorted(CHECKPOINT_RPCS))
def test_checkpoint_rpcs_answer_not_found_for_unknown_objects(stubs, rpc):
    """Every RPC of the Checkpoints service is implemented: for objects that do not exist
    each answers NOT_FOUND naming the (or, with two unknown references, one) missing
    object -- never UNIMPLEMENTED, OK, INTERNAL or UNKNOWN."""
    # The batched calls answer OK, each item's NOT_FOUND in its slot (tests/test_batch.py).
    batched = {"CheckpointMany", "RollbackMany"}
    # HaveLayers names digests (unknown ones are simply not held) and ImportCheckpoint no
    # object at all: tests/test_transfer.py covers them.
    batched |= {"HaveLayers", "ImportCheckpoint"}
    assert set(CHECKPOINT_RPCS) | batched == set(pb.DESCRIPTOR.services_by_name["Checkpoints"]
                                                 .methods_by_name)
    call, ref = CHECKPOINT_RPCS[rpc]
    err = rpc_error(lambda: call(stubs.checkpoints))
    assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details())
    refs = ref if isinstance(ref, tuple) else (ref,)
    assert any(r in err.details() for r in refs), err.details()


def test_health_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "deltabox.v1.Sandboxes", "deltabox.v1.Images", "deltabox.v1.System",
                    "deltabox.v1.Checkpoints"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert r.status == health_pb2.HealthCheckResponse.SERVING, service
    err = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Svc")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="deltabox.v1.Sandboxes"),
    ])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"deltabox.v1.Images", "deltabox.v1.Sandboxes", "deltabox.v1.Checkpoints",
            "deltabox.v1.System", "grpc.health.v1.Health"} <= names
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert files and any(b"deltabox.v1" in f for f in files)


def test_unknown_method_is_unimplemented(channel):
    call = channel.unary_unary("/deltabox.v1.Sandboxes/NoSuchMethod")
    err = rpc_error(lambda: call(b""))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- statuses that must not lie (issue 8) --------------------------------------------------

@pytest.mark.parametrize("limits,field,bound", [
    ({"pids": 2 ** 62}, "pids", "4,194,304"), ({"pids": (1 << 22) + 1}, "pids", "4,194,304"),
    ({"pids": 1}, "pids", "between 4"),
    ({"cpus": 1e9}, "cpus", "0.01"), ({"cpus": 1e-9}, "cpus", "0.01"),
    ({"cpus": 0.001}, "cpus", "0.01"),
], ids=["pids-2^62", "pids-over-max", "pids-1", "cpus-1e9", "cpus-1e-9", "cpus-0.001"])
def test_limits_the_kernel_refuses_are_invalid_arguments(client, stubs, limits, field, bound):
    """Not INTERNAL "Invalid argument ()" from a cgroup file: the field and its bounds."""
    before = {s.id for s in client.list()}
    cgroups = sandbox_cgroups()
    try:
        with pytest.raises(deltabox.InvalidArgument) as exc:
            client.create("tiny", **limits)
        assert exc.value.message.startswith(f"{field} limit must be "), exc.value.message
        assert bound in exc.value.message, exc.value.message
        raw = pb.Limits(pids=limits.get("pids", 0), cpus=limits.get("cpus", 0.0))
        err = rpc_error(lambda: stubs.sandboxes.CreateSandbox(
            pb.CreateSandboxRequest(image="tiny", limits=raw)))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, field, bound)
        assert {s.id for s in client.list()} == before
        assert no_new_cgroups(cgroups), "a failed create left a cgroup"
    finally:
        for s in client.list():
            if s.id not in before:
                s.destroy()


def test_limits_at_their_bounds_work(client):
    with client.create("tiny", pids=4, cpus=0.01) as sbx:
        assert sbx.exec(["echo", "ok"]).stdout == b"ok\n"
        assert (sbx.info.limits.pids, sbx.info.limits.cpus) == (4, 0.01)


def test_argv_and_env_over_the_init_frame_are_refused_clearly(tiny, stubs):
    """One SPAWN request is one frame of at most 1 MiB; a bigger one was split into frames
    the init rejects (INTERNAL "records must be NUL-terminated")."""
    many = ["true"] + ["a" * 1000] * 600
    env = {f"V{i}": "b" * 1000 for i in range(500)}
    with pytest.raises(deltabox.InvalidArgument, match="1,048,576") as exc:
        tiny.exec(many, env=env)
    assert "argv, env and cwd" in exc.value.message
    err = rpc_error(lambda: stubs.sandboxes.Exec(pb.ExecRequest(sandbox=tiny.id, argv=many,
                                                                env=env)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "1,048,576")
    with pytest.raises(deltabox.InvalidArgument, match="1,048,576"):
        tiny.exec(["sh", "-c", "true", "x" * 1000] + ["y" * 100_000] * 11)
    # just under the frame: sent whole and run
    r = tiny.exec(["sh", "-c", 'echo $#; echo ${#V0}', "sh"] + ["a" * 9000] * 90,
                  env={f"V{i}": "b" * 1000 for i in range(100)})
    assert r.exit_code == 0 and r.stdout == b"90\n1000\n", r
    # one string over the kernel's 128 KiB (MAX_ARG_STRLEN): execve's E2BIG, said clearly
    with pytest.raises(deltabox.InvalidArgument, match="128 KiB"):
        tiny.exec(["echo", "z" * (200 << 10)])
    assert tiny.exec(["echo", "alive"]).stdout == b"alive\n"


def test_append_to_a_fifo_is_not_a_regular_file(tiny, stubs):
    tiny.exec("mkfifo /tmp/fifo").check()
    with pytest.raises(deltabox.InvalidArgument, match="not a regular file"):
        tiny.write_file("/tmp/fifo", b"x", append=True)
    with pytest.raises(deltabox.InvalidArgument, match="not a regular file"):
        tiny.read_file("/tmp/fifo")
    # with a reader waiting: opened, but still not written to
    tiny.exec("(cat /tmp/fifo > /tmp/got &) ; sleep 0.2")
    with pytest.raises(deltabox.InvalidArgument, match="not a regular file"):
        tiny.write_file("/tmp/fifo", b"x", append=True)
    assert tiny.stat("/tmp/fifo").type == deltabox.FileType.OTHER
    err = rpc_error(lambda: stubs.sandboxes.WriteFile(pb.WriteFileRequest(
        sandbox=tiny.id, path="/tmp/m", data=b"x", mode=0o200000)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "mode", "0o7777")
    err = rpc_error(lambda: stubs.sandboxes.MakeDir(pb.MakeDirRequest(
        sandbox=tiny.id, path="/tmp/d", mode=0xFFFFFFFF)))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "mode")


GARBAGE = b"\xff\xff\xff\xff\x0f"              # a varint that never ends
BAD_UTF8 = b"\x0a\x03\xff\xfe\xfd"              # field 1 (a string) = invalid UTF-8


@pytest.mark.parametrize("path,kind", [
    ("/deltabox.v1.Sandboxes/GetSandbox", "unary_unary"),
    ("/deltabox.v1.Sandboxes/CreateSandbox", "unary_unary"),
    ("/deltabox.v1.Sandboxes/Exec", "unary_stream"),
    ("/deltabox.v1.Images/ImportImage", "unary_stream"),
    ("/deltabox.v1.Sandboxes/Shell", "stream_stream"),
])
@pytest.mark.parametrize("payload", [GARBAGE, BAD_UTF8], ids=["garbage", "bad-utf8"])
def test_malformed_protobuf_is_invalid_argument(client, channel, path, kind, payload):
    seen = rpc_count(client, path.rsplit("/", 1)[1])
    call = getattr(channel, kind)(path)
    send = iter([payload]) if kind == "stream_stream" else payload
    err = rpc_error(lambda: call(send))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "malformed", path.rsplit("/", 1)[1])
    assert rpc_count(client, path.rsplit("/", 1)[1]) == seen + 1  # counted, as any error
    assert client.status().sandboxes >= 0  # the daemon carries on


LONG = "x" * 10_000


@pytest.mark.parametrize("value", [LONG, "é" * 5_000, "\U0001F600" * 3_000],
                         ids=["ascii-10k", "latin-10k", "emoji-12k"])
def test_long_inputs_are_not_echoed_whole(client, stubs, value):
    """gRPC's client drops trailers over 8 KiB (RESOURCE_EXHAUSTED "Stream removed"):
    what a message echoes is cut to fit."""
    with pytest.raises(deltabox.InvalidArgument) as exc:
        client.create("tiny", name=value)
    msg = exc.value.message
    assert msg.startswith("invalid sandbox name") and "bytes cut" in msg, msg[:200]
    assert len(msg.encode()) <= 1024 and msg.endswith("starting with a letter or digit")
    with pytest.raises(deltabox.NotFound, match="bytes cut"):
        client.get(value)
    err = rpc_error(lambda: stubs.sandboxes.OpenSession(pb.OpenSessionRequest(
        sandbox=value)))
    assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details()[:200])
    with pytest.raises(deltabox.InvalidArgument):
        client.import_image(value, TINY_TAR)


def test_import_with_an_empty_source_is_refused(client, stubs, tmp_path, monkeypatch):
    """Path("").resolve() is the current directory: the client imported it silently."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sh").write_text("not busybox\n")
    monkeypatch.chdir(tmp_path)  # below /tmp, one of the test daemon's image dirs
    seen = rpc_count(client, "ImportImage")
    with pytest.raises(deltabox.InvalidArgument, match="source is required"):
        client.import_image("from-cwd", "")
    assert rpc_count(client, "ImportImage") == seen, "the call reached the daemon"
    assert "from-cwd" not in {i.name for i in client.list_images()}
    for source, mention in (("", "source is required"), ("relative/x.tar", "absolute"),
                            (str(TINY_TAR) + "\0x", "NUL")):
        err = rpc_error(lambda: stubs.images.ImportImage(pb.ImportImageRequest(
            name="from-cwd", source=source)))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, mention)
    assert "from-cwd" not in {i.name for i in client.list_images()}


def test_a_daemon_bug_is_internal_with_an_error_id_in_the_log(tmp_path):
    """A ValueError or TypeError raised by the daemon's own code is a bug, not the client's
    invalid argument (validation raises InvalidArgument explicitly): INTERNAL, with an id
    that the log has too, with the traceback. Shown on the daemon's interceptor, serving a
    real gRPC server with methods that fail each way."""
    import asyncio

    import structlog.testing

    from deltabox.server.app import ErrorInterceptor
    from deltabox.errors import InvalidArgument
    from deltabox.metrics import Metrics

    async def value_error(request, context):
        raise ValueError("too many values to unpack")

    async def type_error(request, context):
        return None + 1

    async def invalid(request, context):
        raise InvalidArgument(f"no good: {request.sandbox}")

    def handler(fn):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=pb.GetSandboxRequest.FromString,
            response_serializer=pb.Sandbox.SerializeToString)

    async def run() -> dict:
        server = grpc.aio.server(interceptors=[ErrorInterceptor(Metrics(), None)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Bugs", {
            "ValueError": handler(value_error), "TypeError": handler(type_error),
            "Invalid": handler(invalid)})])
        server.add_insecure_port(f"unix:{tmp_path / 's.sock'}")
        await server.start()
        out = {}
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 's.sock'}") as ch:
                for name in ("ValueError", "TypeError", "Invalid"):
                    call = ch.unary_unary(f"/t.Bugs/{name}",
                                          request_serializer=pb.GetSandboxRequest.SerializeToString,
                                          response_deserializer=pb.Sandbox.FromString)
                    try:
                        await call(pb.GetSandboxRequest(sandbox="s1"))
                    except grpc.aio.AioRpcError as e:
                        out[name] = (e.code(), e.details())
        finally:
            await server.stop(None)
        return out

    with structlog.testing.capture_logs() as logs:
        got = asyncio.run(run())
    assert got["Invalid"] == (grpc.StatusCode.INVALID_ARGUMENT, "no good: s1")
    for name in ("ValueError", "TypeError"):
        code, details = got[name]
        assert code == grpc.StatusCode.INTERNAL, (name, code, details)
        m = re.search(r"error id ([0-9a-f]{8})", details)
        assert m, details
        assert name in details, details
        logged = [e for e in logs if e.get("error_id") == m.group(1)]
        assert len(logged) == 1 and logged[0]["event"] == "rpc.internal_error", logs
        assert f"{name}:" in logged[0]["traceback"] and name in logged[0]["method"]
