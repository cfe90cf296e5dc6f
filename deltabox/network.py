"""Optional outbound network for a sandbox (`--network nat`), built with pyroute2.

Each NAT sandbox gets its own veth pair and its own /30 from 10.88.0.0/16 (no
shared bridge, so sandboxes cannot reach each other at layer 2):

    host: dbx-<id8> 10.88.a.b+1/30   <->   sandbox: eth0 10.88.a.b+2/30, default route

iptables (installed once, idempotently): MASQUERADE for traffic leaving
10.88.0.0/16, FORWARD allowed out and for replies, dropped between sandboxes;
INPUT from sandboxes to the host itself is dropped, so NAT gives the internet,
not the host's services. The veth disappears with the sandbox's network
namespace; `detach_nat` removes a leftover host end.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import threading

from pyroute2 import IPRoute

__all__ = ["attach_nat", "detach_nat", "allocate_index", "addresses", "MAX_SANDBOXES"]

SUBNET = ipaddress.ip_network("10.88.0.0/16")
MAX_SANDBOXES = SUBNET.num_addresses // 4
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_rules_lock = threading.Lock()
_rules_installed = False


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
    return ("dbx-" + sandbox_id.split("-")[-1])[:15]


def _iptables(*rule: str, table: str = "filter", insert: bool = False) -> None:
    check = ["iptables", "-w", "-t", table, "-C", *rule]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return
    op = "-I" if insert else "-A"
    res = subprocess.run(["iptables", "-w", "-t", table, op, *rule], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(rule)}: {res.stderr.strip()}")


def _install_rules() -> None:
    global _rules_installed
    with _rules_lock:
        if _rules_installed:
            return
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        net = str(SUBNET)
        _iptables("POSTROUTING", "-s", net, "!", "-d", net, "-j", "MASQUERADE", table="nat")
        # Inserted, so they come before a distribution's own rules; -C keeps them unique.
        _iptables("FORWARD", "-s", net, "!", "-d", net, "-j", "ACCEPT", insert=True)
        _iptables("FORWARD", "-d", net, "-m", "conntrack", "--ctstate",
                  "ESTABLISHED,RELATED", "-j", "ACCEPT", insert=True)
        _iptables("FORWARD", "-s", net, "-d", net, "-j", "DROP", insert=True)
        _iptables("INPUT", "-s", net, "-j", "DROP", insert=True)
        _rules_installed = True


def attach_nat(sandbox_id: str, init_pid: int, index: int) -> str:
    """Give the sandbox (by its init's pid) eth0 with outbound NAT; returns its address."""
    _install_rules()
    host_ip, sbx_ip = addresses(index)
    host_if = _host_ifname(sandbox_id)
    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=host_if):  # leftover of a crashed attempt
            ipr.link("del", index=idx)
        ipr.link("add", ifname=host_if, kind="veth",
                 peer={"ifname": "eth0", "net_ns_pid": init_pid})
        idx = ipr.link_lookup(ifname=host_if)[0]
        ipr.addr("add", index=idx, address=host_ip, prefixlen=30)
        ipr.link("set", index=idx, state="up")
    _in_netns(init_pid, lambda ns: _configure_inside(ns, sbx_ip, host_ip))
    return sbx_ip


def _configure_inside(ns: IPRoute, sbx_ip: str, host_ip: str) -> None:
    idx = ns.link_lookup(ifname="eth0")[0]
    ns.addr("add", index=idx, address=sbx_ip, prefixlen=30)
    ns.link("set", index=idx, state="up")
    ns.route("add", dst="0.0.0.0/0", gateway=host_ip)


def _in_netns(pid: int, work) -> None:
    """Run work(IPRoute) with a netlink socket inside pid's network namespace.

    pyroute2's NetNS forks a helper, and fork() in the multi-threaded daemon
    (gRPC's threads) can crash the child. setns() instead moves one dedicated
    thread; the netlink socket it opens stays bound to that namespace.
    """
    errors: list[BaseException] = []

    def run() -> None:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns(net) into pid {pid}: {os.strerror(err)}")
            with IPRoute() as ns:
                work(ns)
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


def detach_nat(sandbox_id: str) -> None:
    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=_host_ifname(sandbox_id)):
            ipr.link("del", index=idx)


def host_nameservers() -> list[str]:
    """The host's resolvers that a sandbox can reach (not loopback ones)."""
    out = []
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    if not ipaddress.ip_address(parts[1]).is_loopback:
                        out.append(parts[1])
    except (OSError, ValueError):
        pass
    return out
