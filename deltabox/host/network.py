"""Optional outbound network for a sandbox (`--network nat`), built with pyroute2.

Each NAT sandbox gets its own veth pair and its own /30 from 10.88.0.0/16 (no
shared bridge, so sandboxes cannot reach each other at layer 2):

    host: dbx-<id8> 10.88.a.b+1/30   <->   sandbox: eth0 10.88.a.b+2/30, default route

A sandbox's root keeps CAP_NET_RAW and CAP_NET_ADMIN in its own namespace: it can
forge any source address and send any frame down its veth. So the rules key on
the *interface* a packet came in on (`dbx-+`), never on its source address:

- raw PREROUTING: a packet from a sandbox whose source is not routed back through
  the same veth (strict reverse-path, `-m rpfilter`: only its own /30) is dropped
  before conntrack or NAT sees it; `rp_filter=1` on the host end does the same in
  the kernel's routing, as a second line.
- INPUT: everything from a sandbox is dropped, whatever the destination: every
  address of the host (the veth's, eth0's, ...) is unreachable.
- DELTABOX-FORWARD: sandbox -> sandbox dropped; sandbox -> out accepted; into a
  sandbox only replies (conntrack), so nothing outside can open connections to it.
- nat POSTROUTING: MASQUERADE for 10.88.0.0/16 going elsewhere.
- no IPv6 on either end of the veth (`disable_ipv6` before the link goes up: no
  link-local address to connect to, router advertisements ignored), and ip6tables
  drops anything from or to a sandbox's veth in case IPv6 is turned back on.

The host-wide rules are installed idempotently and checked again at each attach
(a firewall reload may have flushed them); nothing is per sandbox except the
veth and its sysctls, which disappear with the sandbox's network namespace;
`detach_nat` removes a leftover host end.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
import threading

__all__ = ["attach_nat", "detach_nat", "allocate_index", "addresses", "host_nameservers",
           "MAX_SANDBOXES", "loopback_up"]

SUBNET = ipaddress.ip_network("10.88.0.0/16")
MAX_SANDBOXES = SUBNET.num_addresses // 4
HOST_IF_PREFIX = "dbx-"
SANDBOX_IFS = HOST_IF_PREFIX + "+"  # iptables' wildcard: the host end of every sandbox's veth
FORWARD_CHAIN = "DELTABOX-FORWARD"
HAS_IPV6 = os.path.isdir("/proc/sys/net/ipv6")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_rules_lock = threading.Lock()
_legacy_removed = False

# The rules of earlier versions matched source addresses, which a sandbox forges.
_LEGACY_RULES = (
    ("filter", ("INPUT", "-s", str(SUBNET), "-j", "DROP")),
    ("filter", ("FORWARD", "-s", str(SUBNET), "-d", str(SUBNET), "-j", "DROP")),
    ("filter", ("FORWARD", "-d", str(SUBNET), "-m", "conntrack", "--ctstate",
                "RELATED,ESTABLISHED", "-j", "ACCEPT")),
    ("filter", ("FORWARD", "-s", str(SUBNET), "!", "-d", str(SUBNET), "-j", "ACCEPT")),
)


def addresses(index: int) -> tuple[str, str]:
    """(host side, sandbox side) addresses of the index-th /30."""
    base = int(SUBNET.network_address) + 4 * index
    return str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))


def allocate_index(used: set[int]) -> int:
    for i in range(MAX_SANDBOXES):
        if i not in used:
            return i
    raise RuntimeError("no free NAT subnets")


def _host_ifname(sandbox_id: str) -> str:
    return (HOST_IF_PREFIX + sandbox_id.split("-")[-1])[:15]


def _xtables(tool: str, table: str, op: str, *rule: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool, "-w", "-t", table, op, *rule], capture_output=True, text=True)


def _ensure_rule(*rule: str, table: str = "filter", insert: bool = False,
                 tool: str = "iptables") -> None:
    if _xtables(tool, table, "-C", *rule).returncode == 0:
        return
    res = _xtables(tool, table, "-I" if insert else "-A", *rule)
    if res.returncode != 0:
        raise RuntimeError(f"{tool} -t {table} {' '.join(rule)}: {res.stderr.strip()}")


def _forward_chain_rules() -> list[str]:
    """In `iptables -S`'s own spelling, so that an intact chain compares equal."""
    c, ifs = FORWARD_CHAIN, SANDBOX_IFS
    return [f"-A {c} -i {ifs} -o {ifs} -j DROP",
            f"-A {c} -s {SUBNET} ! -d {SUBNET} -i {ifs} -j ACCEPT",
            f"-A {c} -i {ifs} -j DROP",
            f"-A {c} -o {ifs} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A {c} -o {ifs} -j DROP"]


def _ensure_forward_chain() -> None:
    """DELTABOX-FORWARD holds exactly our rules; rewritten in one transaction if not."""
    want = [f"-N {FORWARD_CHAIN}", *_forward_chain_rules()]
    have = _xtables("iptables", "filter", "-S", FORWARD_CHAIN)
    if have.returncode == 0 and have.stdout.split("\n")[:-1] == want:
        return
    # A chain named in a --noflush restore is flushed and refilled atomically, so the
    # sandboxes already running are never without their rules.
    text = f"*filter\n:{FORWARD_CHAIN} - [0:0]\n" + "\n".join(want[1:]) + "\nCOMMIT\n"
    res = subprocess.run(["iptables-restore", "-w", "--noflush"], input=text,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"iptables-restore {FORWARD_CHAIN}: {res.stderr.strip()}")


def _remove_legacy_rules() -> None:
    global _legacy_removed
    if _legacy_removed:
        return
    for table, rule in _LEGACY_RULES:
        while _xtables("iptables", table, "-C", *rule).returncode == 0:
            if _xtables("iptables", table, "-D", *rule).returncode != 0:
                break
    _legacy_removed = True


def _install_rules() -> None:
    """The host-wide rules (module docstring). Idempotent; cheap enough for every attach."""
    with _rules_lock:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        _ensure_rule("PREROUTING", "-i", SANDBOX_IFS, "-m", "rpfilter", "--invert",
                     "-j", "DROP", table="raw", insert=True)
        # Inserted, so they come before a distribution's own rules; -C keeps them unique.
        _ensure_rule("INPUT", "-i", SANDBOX_IFS, "-j", "DROP", insert=True)
        _ensure_forward_chain()
        for direction in ("-o", "-i"):
            _ensure_rule("FORWARD", direction, SANDBOX_IFS, "-j", FORWARD_CHAIN, insert=True)
        net = str(SUBNET)
        _ensure_rule("POSTROUTING", "-s", net, "!", "-d", net, "-j", "MASQUERADE", table="nat")
        if HAS_IPV6:
            for rule in (("INPUT", "-i", SANDBOX_IFS), ("FORWARD", "-i", SANDBOX_IFS),
                         ("FORWARD", "-o", SANDBOX_IFS)):
                _ensure_rule(*rule, "-j", "DROP", insert=True, tool="ip6tables")
        _remove_legacy_rules()


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _harden_host_end(ifname: str) -> None:
    """Per-interface sysctls of the host end, set while it is still down."""
    if HAS_IPV6:
        # Before the link goes up: no link-local address ever exists, and IPv6 that
        # arrives (router advertisements included) is dropped by the kernel.
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")
    conf = f"/proc/sys/net/ipv4/conf/{ifname}"
    _write_sysctl(f"{conf}/rp_filter", "1")   # strict: sources of its own /30 only
    _write_sysctl(f"{conf}/arp_ignore", "1")  # answer ARP for the veth's address only


def IPRoute(*args, **kwargs):
    """pyroute2's IPRoute, imported on first use: importing pyroute2 costs ~0.24 s of
    CPU, which only NAT sandboxes need (a restore's `loopback_up` does not)."""
    from pyroute2 import IPRoute as _IPRoute
    return _IPRoute(*args, **kwargs)


def attach_nat(sandbox_id: str, init_pid: int, index: int) -> str:
    """Give the sandbox (by its init's pid) eth0 with outbound NAT; returns its address."""
    _install_rules()
    host_ip, sbx_ip = addresses(index)
    host_if = _host_ifname(sandbox_id)
    with IPRoute() as ipr:
        _delete_link(ipr, host_if)  # of the previous incarnation, or a crashed attempt
        ipr.link("add", ifname=host_if, kind="veth",
                 peer={"ifname": "eth0", "net_ns_pid": init_pid})
        idx = ipr.link_lookup(ifname=host_if)[0]
        _harden_host_end(host_if)
        ipr.addr("add", index=idx, address=host_ip, prefixlen=30)
        ipr.link("set", index=idx, state="up")
    _in_netns(init_pid, lambda ns: _configure_inside(ns, sbx_ip, host_ip))
    return sbx_ip


def _configure_inside(ns: IPRoute, sbx_ip: str, host_ip: str) -> None:
    idx = ns.link_lookup(ifname="eth0")[0]
    if HAS_IPV6:
        # /proc/sys/net is this thread's namespace (setns). The sandbox's /proc/sys is
        # read-only, so its root cannot turn IPv6 back on (the host end refuses it anyway).
        _write_sysctl("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1")
    ns.addr("add", index=idx, address=sbx_ip, prefixlen=30)
    ns.link("set", index=idx, state="up")
    ns.route("add", dst="0.0.0.0/0", gateway=host_ip)


def _in_netns(pid: int, work) -> None:
    """Run work(IPRoute) with a netlink socket inside pid's network namespace."""
    def run() -> None:
        with IPRoute() as ns:
            work(ns)
    _in_netns_thread(pid, run)


def _in_netns_thread(pid: int, work) -> None:
    """Run work() in a thread that joined pid's network namespace.

    pyroute2's NetNS forks a helper, and fork() in the multi-threaded daemon
    (gRPC's threads) can crash the child. setns() instead moves one dedicated
    thread; the sockets it opens stay bound to that namespace.
    """
    errors: list[BaseException] = []

    def run() -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns(net) into pid {pid}: {os.strerror(err)}")
            work()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
        finally:
            os.close(fd)

    # The thread ends with its namespace; nothing else ever runs in it.
    t = threading.Thread(target=run, name=f"netns-{pid}")
    t.start()
    t.join()
    if errors:
        raise errors[0]


_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ_FLAGS = "16sH22x"  # struct ifreq: the name, then ifr_flags in its 24-byte union


def loopback_up(pid: int) -> None:
    """Bring up `lo` in pid's network namespace: a full checkpoint's namespace is restored
    empty (see deltabox.host.criu), as a fresh sandbox's init finds it before it brings
    up `lo` itself. Two ioctls (SIOCGIFFLAGS/SIOCSIFFLAGS, what `ip link set lo up`
    amounts to), not a pyroute2 IPRoute: that one costs ~2.5 ms of the daemon's CPU
    per restore, these ~0.1 ms."""
    def up() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            got = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack(_IFREQ_FLAGS, b"lo", 0))
            flags = struct.unpack(_IFREQ_FLAGS, got)[1]
            if not flags & _IFF_UP:
                fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS,
                            struct.pack(_IFREQ_FLAGS, b"lo", flags | _IFF_UP))
    _in_netns_thread(pid, up)


def detach_nat(sandbox_id: str) -> None:
    with IPRoute() as ipr:
        _delete_link(ipr, _host_ifname(sandbox_id))


def _delete_link(ipr: IPRoute, ifname: str) -> None:
    """Delete the link if it exists. When a sandbox's network namespace dies (its init
    was just killed) the kernel deletes its veth pair itself, asynchronously: a link
    that vanishes between the lookup and the delete is gone, as wanted."""
    from pyroute2.netlink.exceptions import NetlinkError
    for idx in ipr.link_lookup(ifname=ifname):
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


def _resolv_conf_servers(path: str) -> list[str]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append(parts[1].split("%")[0])
    except OSError:
        pass
    return out


def _host_ipv4_addresses() -> set[ipaddress.IPv4Address]:
    with IPRoute() as ipr:
        return {ipaddress.ip_address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
                for a in ipr.get_addr(family=socket.AF_INET)}


def host_nameservers(resolv_conf: str = "/etc/resolv.conf",
                     resolved_upstream: str = "/run/systemd/resolve/resolv.conf") -> list[str]:
    """The host's resolvers that a NAT sandbox can reach, for its /etc/resolv.conf.

    Only IPv4 ones (the sandbox has no IPv6) that are not the host's own addresses:
    INPUT drops everything from a sandbox, DNS included, rather than open a hole to a
    resolver on the host. When that leaves none (systemd-resolved's 127.0.0.53), the
    upstream servers systemd-resolved itself uses, as Docker does. May be empty: the
    image's own resolv.conf is then left alone.
    """
    local = _host_ipv4_addresses()

    def usable(server: str) -> bool:
        try:
            ip = ipaddress.ip_address(server)
        except ValueError:
            return False
        return ip.version == 4 and not ip.is_loopback and not ip.is_unspecified \
            and ip not in local and ip not in SUBNET

    for path in (resolv_conf, resolved_upstream):
        out = [s for s in _resolv_conf_servers(path) if usable(s)]
        if out:
            return list(dict.fromkeys(out))
    return []
