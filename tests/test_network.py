"""Networking: loopback only by default; `nat` gives outbound access, not the host's services.

The "outside world" is a test host: a network namespace made here with a veth
to the host (addresses in 10.99.0.0/24), running a TCP server.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

PEER_IP = "10.99.0.2"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def peer_host():
    ns = f"dbxpeer-{uuid.uuid4().hex[:6]}"
    host_if = f"dbxp{uuid.uuid4().hex[:6]}"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "addr", "add", "10.99.0.1/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        for cmd in (["ip", "addr", "add", f"{PEER_IP}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "default", "via", "10.99.0.1"]):
            _run("ip", "netns", "exec", ns, *cmd)
        server = subprocess.Popen(
            # `ip netns exec` execs python3 itself, so killing the Popen kills the
            # server (a leftover would pin the daemon's store in its mount namespace).
            ["ip", "netns", "exec", ns, "python3", "-c",
             "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
             "socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 8080)); s.listen(); "
             "s.settimeout(120)\n"
             "print('ready', flush=True)\n"
             "while True:\n c, a = s.accept(); c.sendall(('peer saw ' + a[0]).encode()); "
             "c.close()"], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        yield ns
        server.kill()
        server.wait()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


CONNECT = ("import socket,sys\n"
           "try:\n s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
           " print(s.recv(100).decode())\n"
           "except OSError as e:\n print('error', type(e).__name__); sys.exit(1)\n")


def test_default_sandbox_has_no_route_out(client, peer_host):
    with client.create("demo") as sbx:
        r = sbx.exec(["python3", "-c", CONNECT, PEER_IP, "8080"])
        assert r.exit_code == 1 and b"error" in r.stdout
        assert sbx.info.ip_address == ""


def test_nat_reaches_outside_but_not_the_host(client, peer_host):
    with client.create("demo", network="nat") as sbx:
        assert sbx.info.ip_address.startswith("10.88.")
        r = sbx.exec(["python3", "-c", CONNECT, PEER_IP, "8080"])
        assert r.exit_code == 0, r
        # masqueraded: the peer sees the host's address, not the sandbox's
        assert r.stdout.strip() == b"peer saw 10.99.0.1"
        # the host's own addresses are not reachable from the sandbox
        host_side = sbx.info.ip_address.rsplit(".", 1)[0] + "." + str(
            int(sbx.info.ip_address.rsplit(".", 1)[1]) - 1)
        for addr in (host_side, "10.99.0.1"):
            r = sbx.exec(["python3", "-c", CONNECT, addr, "8080"])
            assert r.exit_code == 1, (addr, r)
        host_if = ("dbx-" + sbx.id.split("-")[-1])[:15]  # IFNAMSIZ
        assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode == 0
    # the veth went away with the sandbox
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0


def test_two_nat_sandboxes_get_distinct_subnets_and_cannot_talk(client, peer_host):
    with client.create("demo", network="nat") as a, client.create("demo", network="nat") as b:
        assert a.info.ip_address != b.info.ip_address
        server = ("import socket\ns=socket.socket(); s.bind(('0.0.0.0', 9090)); s.listen(); "
                  "s.settimeout(5)\ntry:\n c,_=s.accept(); c.sendall(b'hi')\nexcept OSError: pass")
        b.exec(f"nohup python3 -c \"{server}\" >/dev/null 2>&1 &")
        r = a.exec(["python3", "-c", CONNECT, b.info.ip_address, "9090"])
        assert r.exit_code == 1, r
