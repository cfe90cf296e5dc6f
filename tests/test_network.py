"""Networking: loopback only by default; `nat` gives outbound access, not the host's services.

The "outside world" is a test host: a network namespace made here with a veth
to the host (addresses in 10.99.0.0/24), running a TCP server.

NAT tests never skip because a sandbox's NAT set-up failed: that is a failure. They skip
only where `nat_unavailable()` finds a piece the host lacks (a tool, a kernel table, match
or target, veth), and the reason names it.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from deltabox.host import network

PEER_IP = "10.99.0.2"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _probe(*cmd: str) -> str | None:
    """None if `cmd` succeeds, else its error output."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr or r.stdout).strip() or f"exit {r.returncode}"


# What deltabox/host/network.py's NAT uses: tool -> (table, chain rule probed in a scratch chain)
_NAT_PROBES = (
    ("iptables", "nat", ("-j", "MASQUERADE"), "the MASQUERADE target (CONFIG_NFT_MASQ or "
     "CONFIG_IP_NF_TARGET_MASQUERADE)"),
    ("iptables", "raw", ("-m", "rpfilter", "--invert", "-j", "DROP"), "the rpfilter match "
     "(CONFIG_IP_NF_MATCH_RPFILTER)"),
    ("iptables", "filter", ("-j", "DROP"), "the iptables filter table"),
)


@functools.cache
def nat_unavailable() -> str | None:
    """Why this host cannot give a sandbox NAT -- the missing userspace tool or kernel piece,
    each probed for real -- or None, and then every NAT test runs and a NAT set-up that
    fails fails the test."""
    tools = ["ip", "iptables", "iptables-restore"] + (["ip6tables"] if network.HAS_IPV6 else [])
    for tool in tools:
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (userspace: {'iproute2' if tool == 'ip' else 'iptables'})"
    name = f"dbxprobe{uuid.uuid4().hex[:6]}"
    if (err := _probe("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")):
        return f"the kernel cannot make a veth pair (CONFIG_VETH): {err}"
    subprocess.run(["ip", "link", "del", name], capture_output=True)
    chain = "DBX-PROBE-" + uuid.uuid4().hex[:6].upper()
    for tool, table, rule, piece in _NAT_PROBES:
        if (err := _probe(tool, "-w", "-t", table, "-N", chain)):
            return f"no iptables {table} table in this kernel ({tool} -t {table}): {err}"
        try:
            if (err := _probe(tool, "-w", "-t", table, "-A", chain, *rule)):
                return f"no {piece} in this kernel: {err}"
        finally:
            subprocess.run([tool, "-w", "-t", table, "-F", chain], capture_output=True)
            subprocess.run([tool, "-w", "-t", table, "-X", chain], capture_output=True)
    if network.HAS_IPV6 and (err := _probe("ip6tables", "-w", "-t", "filter", "-S")):
        return f"no ip6tables filter table in this kernel: {err}"
    return None


@pytest.fixture
def nat_host():
    """For NAT tests: skip, naming the missing piece, only where the host cannot do NAT."""
    if (missing := nat_unavailable()):
        pytest.skip(f"the host cannot do NAT: {missing}")


def _host_if(sbx) -> str:
    return ("dbx-" + sbx.id.split("-")[-1])[:15]  # IFNAMSIZ


@pytest.fixture
def peer_host(nat_host):
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
        host_if = _host_if(sbx)
        assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode == 0
    # the veth went away with the sandbox
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0


# A TCP server in a sandbox (for 60 s) that answers 'sandbox here'. It listens before the
# exec returns, and is in its own session by then.
SERVE = ("import os,socket,sys,time\n"
         "s=socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(); s.settimeout(1)\n"
         "r,w=os.pipe()\n"
         "if os.fork(): os.read(r, 1); os._exit(0)\n"
         "os.setsid(); os.write(w, b'.'); end=time.time()+60\n"
         "while time.time()<end:\n"
         " try:\n  c,_=s.accept(); c.sendall(b'sandbox here'); c.close()\n"
         " except OSError: pass\n")


def _serve_in(sbx, port: int) -> None:
    assert sbx.exec(["python3", "-c", SERVE, str(port)]).exit_code == 0
    # sanity: it answers, inside the sandbox, on the sandbox's eth0 address
    r = sbx.exec(["python3", "-c", CONNECT, sbx.info.ip_address, str(port)])
    assert r.stdout.strip() == b"sandbox here", r


def test_two_nat_sandboxes_get_distinct_subnets_and_cannot_talk(client, peer_host):
    with client.create("demo", network="nat") as a, client.create("demo", network="nat") as b:
        assert a.info.ip_address != b.info.ip_address
        _serve_in(b, 9090)
        r = a.exec(["python3", "-c", CONNECT, b.info.ip_address, "9090"])
        assert r.exit_code == 1, r


def test_nothing_outside_can_open_a_connection_into_a_nat_sandbox(client, peer_host):
    """Only replies are forwarded into a sandbox, even from a host routing 10.88/16 to us."""
    with client.create("demo", network="nat") as sbx:
        _serve_in(sbx, 9090)
        _run("ip", "netns", "exec", peer_host, "ip", "route", "add", str(network.SUBNET),
             "via", "10.99.0.1")
        r = subprocess.run(["ip", "netns", "exec", peer_host, "python3", "-c", CONNECT,
                            sbx.info.ip_address, "9090"], capture_output=True)
        assert r.returncode == 1 and b"error" in r.stdout, r


# A sandbox's root has CAP_NET_RAW: it can put any IPv6 frame on its veth, whatever
# its own interface's IPv6 settings. Ethernet + IPv6 + UDP, from fe80::1.
V6_FRAMES = r"""
import json, socket, struct, sys
port, host_mac = int(sys.argv[1]), bytes.fromhex(sys.argv[2].replace(":", ""))
def csum(b):
    s = sum(struct.unpack("!%dH" % ((len(b) + 1) // 2), b + b"\0" * (len(b) % 2)))
    while s >> 16:
        s = (s >> 16) + (s & 0xffff)
    return ~s & 0xffff
p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
p.bind(("eth0", 0))
own_mac = p.getsockname()[4]
src = socket.inet_pton(socket.AF_INET6, "fe80::1")
for dst in sys.argv[3:]:
    d = socket.inet_pton(socket.AF_INET6, dst)
    mac = b"\x33\x33" + d[-4:] if d[0] == 0xff else host_mac
    payload = b"V6-FRAME-" + dst.encode()
    n = 8 + len(payload)
    udp = struct.pack("!HHHH", 40000, port, n, 0) + payload
    c = csum(src + d + struct.pack("!IxxxB", n, 17) + udp) or 0xffff
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    for _ in range(3):
        p.send(mac + own_mac + b"\x86\xdd" + struct.pack("!IHBB", 6 << 28, n, 17, 64)
               + src + d + udp)
v6 = open("/proc/net/if_inet6").read() if __import__("os").path.exists("/proc/net/if_inet6") else ""
try:
    open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "w").write("0")
    reenable = "allowed"
except OSError as e:
    reenable = "refused"
print(json.dumps({"disable_ipv6": open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6").read().strip(),
                  "eth0_v6": [l for l in v6.splitlines() if l.endswith("eth0")],
                  "reenable": reenable}))
"""


def _eui64_link_local(mac: str) -> str:
    b = bytearray(bytes.fromhex(mac.replace(":", "")))
    b[0] ^= 2
    iid = bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + iid))


@pytest.mark.skipif(not network.HAS_IPV6, reason="the kernel has no IPv6 "
                    "(/proc/sys/net/ipv6 is absent): nothing to leak")
def test_nat_veth_has_no_ipv6_at_either_end(client, nat_host):
    """No IPv6 on the veth: no link-local address to connect to, and IPv6 frames the
    sandbox crafts itself (to the host's addresses, all-nodes) are dropped."""
    got: list = []
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 0))
    s.settimeout(0.2)
    port, stop = s.getsockname()[1], threading.Event()

    def listen():
        while not stop.is_set():
            try:
                got.append(s.recvfrom(256))
            except socket.timeout:
                pass
    t = threading.Thread(target=listen)
    t.start()
    try:
        with client.create("demo", network="nat") as sbx:
            host_if = _host_if(sbx)
            with open(f"/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6") as f:
                assert f.read().strip() == "1"
            with open(f"/proc/sys/net/ipv4/conf/{host_if}/rp_filter") as f:
                assert f.read().strip() == "1"
            out = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", host_if],
                                 capture_output=True, text=True, check=True).stdout
            assert out == "", out
            with open(f"/sys/class/net/{host_if}/address") as f:
                mac = f.read().strip()
            host_v6 = subprocess.run(["ip", "-6", "-o", "addr", "show", "scope", "global"],
                                     capture_output=True, text=True).stdout.split()
            targets = ["ff02::1", _eui64_link_local(mac)] + [
                w.split("/")[0] for i, w in enumerate(host_v6) if host_v6[i - 1] == "inet6"]
            r = sbx.exec(["python3", "-c", V6_FRAMES, str(port), mac, *targets])
            assert r.exit_code == 0, r
            inside = json.loads(r.stdout.strip().splitlines()[-1])
            time.sleep(0.5)
        # sanity: the listener does receive
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"sanity", ("::1", port))
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
        s.close()
    assert inside == {"disable_ipv6": "1", "eth0_v6": [], "reenable": "refused"}, inside
    assert [d for d, _ in got] == [b"sanity"], f"IPv6 from the sandbox reached the host: {got}"


def test_host_nameservers_leave_out_what_a_sandbox_cannot_reach(tmp_path):
    own = next(iter(network._host_ipv4_addresses() - {ipaddress.ip_address("127.0.0.1")}))
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"# comment\nnameserver 127.0.0.53\nnameserver {own}\nnameserver fd00::53\n"
                    "nameserver 10.88.0.1\nnameserver 192.0.2.53\nsearch example\n"
                    "nameserver 192.0.2.53\nnameserver 198.51.100.53\n")
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("nameserver 203.0.113.53\n")
    assert network.host_nameservers(str(conf), str(upstream)) == ["192.0.2.53", "198.51.100.53"]
    # only the host's own resolver (systemd-resolved): its upstream servers instead
    conf.write_text("nameserver 127.0.0.53\noptions edns0\n")
    assert network.host_nameservers(str(conf), str(upstream)) == ["203.0.113.53"]
    assert network.host_nameservers(str(conf), str(tmp_path / "absent")) == []


def test_nat_rules_are_installed_once_and_keyed_on_the_veths(client, nat_host):
    with client.create("tiny", network="nat"), client.create("tiny", network="nat"):
        rules = {t: subprocess.run(["iptables", "-w", "-t", t, "-S"], capture_output=True,
                                   text=True, check=True).stdout.splitlines()
                 for t in ("raw", "filter", "nat")}
    assert rules["raw"].count("-A PREROUTING -i dbx-+ -m rpfilter --invert -j DROP") == 1
    assert rules["filter"].count("-A INPUT -i dbx-+ -j DROP") == 1
    for d in ("-i", "-o"):
        assert rules["filter"].count(f"-A FORWARD {d} dbx-+ -j {network.FORWARD_CHAIN}") == 1
    chain = [r for r in rules["filter"] if r.startswith(f"-A {network.FORWARD_CHAIN} ")]
    assert chain == network._forward_chain_rules()
    assert rules["nat"].count("-A POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 "
                              "-j MASQUERADE") == 1
    # nothing keyed on a source address alone (a sandbox forges those)
    assert not [r for r in rules["filter"] if r.startswith(("-A INPUT -s 10.88.",
                                                             "-A FORWARD -s 10.88."))]
