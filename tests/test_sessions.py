"""Persistent sessions: state (variables, cwd, env, functions, imports) survives between calls."""

from __future__ import annotations

import threading
import time

import pytest

import deltabox


def test_bash_session_keeps_state(demo):
    sh = demo.open_session("bash")
    assert sh.run("X=41; export E=env-value; cd /tmp; inc() { X=$((X+1)); }").exit_code == 0
    sh.run("inc")
    r = sh.run("echo $X $E $(pwd); type inc | head -1")
    assert r.stdout.splitlines() == [b"42 env-value /tmp", b"inc is a function"]
    assert sh.run("false").exit_code == 1
    assert sh.run("(exit 5)").exit_code == 5
    r = sh.run("echo out; echo err >&2")
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")


def test_bash_session_syntax_error_does_not_break_it(demo):
    sh = demo.open_session("bash")
    r = sh.run("if then fi (")
    assert r.exit_code != 0 and r.stderr
    assert sh.run("echo still here").stdout == b"still here\n"
    # output without a trailing newline, and code with quotes and heredocs
    assert sh.run("printf abc").stdout == b"abc"
    r = sh.run("cat <<'EOF'\n'quoted' \"double\" $HOME\nEOF")
    assert r.stdout == b"'quoted' \"double\" $HOME\n"


def test_python_session_keeps_objects_and_imports(demo):
    py = demo.open_session("python", name="py1")
    assert py.name == "py1"
    py.run("import json, collections\ndata = collections.Counter('hello')")
    r = py.run("print(json.dumps(data.most_common(1)))")
    assert r.stdout == b'[["l", 2]]\n' and r.exit_code == 0
    r = py.run("raise ValueError('boom')")
    assert r.exit_code == 1 and b"ValueError: boom" in r.stderr
    assert py.run("print(data['h'])").stdout == b"1\n"
    assert py.run("import sys; sys.exit(3)").exit_code == 3
    assert py.run("print('alive')").stdout == b"alive\n"


def test_sh_session_on_tiny_image(tiny):
    sh = tiny.open_session("sh")
    sh.run("A=1; cd /etc")
    assert sh.run("echo $A $(pwd)").stdout == b"1 /etc\n"


def test_session_timeout_interrupts_but_keeps_state(demo):
    sh = demo.open_session("bash")
    sh.run("KEEP=yes")
    t0 = time.monotonic()
    with pytest.raises(deltabox.DeadlineExceeded):
        sh.run("sleep 30", timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert sh.run("echo $KEEP").stdout == b"yes\n"
    py = demo.open_session("python")
    py.run("x = 7")
    with pytest.raises(deltabox.DeadlineExceeded):
        py.run("while True: pass", timeout=0.5)
    assert py.run("print(x)").stdout == b"7\n"


def test_one_call_at_a_time(demo):
    sh = demo.open_session("bash")
    errors = []

    def slow():
        sh.run("sleep 1")
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    try:
        sh.run("true")
    except deltabox.FailedPrecondition as e:
        errors.append(e)
    t.join()
    assert errors and "busy" in str(errors[0])


def test_list_close_and_lookup(demo, client):
    a = demo.open_session("bash", name="a")
    demo.open_session("python", name="b")
    names = {(s.name, s.kind) for s in demo.list_sessions()}
    assert {("a", "bash"), ("b", "python")} <= names
    with pytest.raises(deltabox.FailedPrecondition):
        demo.open_session("bash", name="a")
    # a new client (e.g. after a trainer restart) finds the session and its state
    a.run("V=persisted")
    with deltabox.Client(client.target.removeprefix("unix:")) as c2:
        again = c2.get(demo.id).session("a")
        assert again.run("echo $V").stdout == b"persisted\n"
    a.close()
    assert "a" not in {s.name for s in demo.list_sessions()}
    with pytest.raises(deltabox.NotFound):
        a.run("true")


def test_exit_ends_the_session(demo):
    sh = demo.open_session("bash")
    with pytest.raises(deltabox.FailedPrecondition, match="ended"):
        sh.run("exit 4")
    assert sh.name not in {s.name for s in demo.list_sessions()}


def test_session_output_is_not_mixed_with_background_noise(demo):
    sh = demo.open_session("bash")
    r = sh.run("for i in 1 2 3; do echo line$i; done")
    assert r.stdout == b"line1\nline2\nline3\n"


def test_unknown_kind_rejected(demo):
    with pytest.raises(deltabox.InvalidArgument, match="fish"):
        demo.open_session("fish")
