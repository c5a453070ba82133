"""A network of the test's own: one network namespace joined to the root one by a veth pair.

Loopback always answers, so it cannot lose a peer.  Here the peer runs in a
namespace of its own (``ip netns exec``), the server in the root namespace
bound to its end of the veth pair, and :meth:`VethLink.vanish` takes the
peer's end down: the peer disappears with no FIN and no reset, as a phone out
of coverage does.  :meth:`VethLink.limit` shapes the server's side of the
link with ``tc ... tbf``.

Names and addresses are unique per test run: the namespace is
``tlsuv<pid>-<n>``, the veth ends ``tu<pid>x<n>a`` (root) and ``...b``
(namespace), and the /30 inside 10.200.0.0/16 is picked from the pid and
checked to be unused, so parallel runs cannot collide.  A finalizer deletes
the namespace and the veth pair even when the test fails; namespaces that a
killed run left behind (its pid is gone) are deleted by the next run.

Needs root and iproute2 (``ip``, ``tc``, ``ss``).  Without them the tests
skip with the reason, unless ``TLSUV_REQUIRE_NETNS=1`` (set by .ci/run),
which makes that a failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import helpers

INSTALL = "apt-get install -y iproute2"
CLIENT = Path(__file__).resolve().parent / "netns_client.py"
NAME = re.compile(r"^tlsuv(\d+)-(\d+)\b")
# 10.200.0.0/16: private (RFC 1918), and only ever inside these namespaces.
BASE = ipaddress.IPv4Network("10.200.0.0/16")

_counter = itertools.count()


def unavailable(message: str) -> NoReturn:
    """Skip, or fail where the environment promised namespaces (TLSUV_REQUIRE_NETNS=1)."""
    helpers.unavailable(message, "TLSUV_REQUIRE_NETNS")


def tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
        None)
    if path is None:
        unavailable(f"{name} is not installed (Debian/Ubuntu, as root: {INSTALL})")
    assert path is not None
    return path


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else: still alive
        return True
    return True


def remove_stale(ip: str) -> None:
    """Delete namespaces a killed test run left behind (their pid no longer exists)."""
    listing = run(ip, "netns", "list", check=False).stdout
    for line in listing.splitlines():
        m = NAME.match(line.strip())
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            name = line.split()[0]
            run(ip, "link", "del", f"tu{m.group(1)}x{m.group(2)}a", check=False)
            run(ip, "netns", "del", name, check=False)


def _free_subnet(ip: str, n: int) -> ipaddress.IPv4Network:
    used = run(ip, "-4", "-o", "addr", "show", check=False).stdout
    subnets = list(BASE.subnets(new_prefix=30))
    start = (os.getpid() * 61 + n * 7) % len(subnets)
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if not any(f" {host}/" in used for host in net.hosts()):
            return net
    raise RuntimeError("no free /30 in 10.200.0.0/16")


@dataclass
class VethLink:
    ip: str
    tc: str
    ss: str
    ns: str
    host_if: str  # the root namespace's end: the server's side
    peer_if: str  # the namespace's end: the vanishing peer's side
    host_addr: str
    peer_addr: str

    def ns_argv(self, *argv: str) -> list[str]:
        """``argv`` as a command run inside the namespace."""
        return [self.ip, "netns", "exec", self.ns, *argv]

    def client_argv(self, *args: str) -> list[str]:
        """tests/netns_client.py with ``args``, inside the namespace, on this interpreter."""
        return self.ns_argv(sys.executable, str(CLIENT), *args)

    def vanish(self) -> None:
        """Take the peer's link down: from now on it neither sends nor answers anything."""
        run(self.ip, "-n", self.ns, "link", "set", self.peer_if, "down")

    def limit(self, rate: str) -> None:
        """Shape what the server sends to the peer to ``rate`` (e.g. ``4mbit``) with a token bucket."""
        # burst: a few packets at once; latency: how long a packet may queue
        # before tbf drops it (TCP then backs off, as on a real slow link).
        proc = run(self.tc, "qdisc", "add", "dev", self.host_if, "root", "tbf", "rate", rate,
                   "burst", "32kbit", "latency", "400ms", check=False)
        if proc.returncode != 0:
            unavailable(f"tc cannot add a tbf qdisc here: {proc.stderr.strip()}")

    def server_sockets(self) -> list[str]:
        """The server-side TCP sockets to the peer, as ``ss -tano`` shows them (state, timers)."""
        out = run(self.ss, "-tanoH", "dst", self.peer_addr).stdout
        return [line for line in out.splitlines() if line.strip()]

    def remove(self) -> None:
        run(self.ip, "link", "del", self.host_if, check=False)  # takes the peer end with it
        run(self.ip, "netns", "del", self.ns, check=False)


def make_link() -> tuple[VethLink, list[str]]:
    """A fresh namespace and veth pair; returns the link and any set-up error (then it is removed)."""
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    ip, tc, ss = tool("ip"), tool("tc"), tool("ss")
    remove_stale(ip)
    pid, n = os.getpid(), next(_counter)
    net = _free_subnet(ip, n)
    host_addr, peer_addr = (str(h) for h in net.hosts())
    link = VethLink(ip, tc, ss, f"tlsuv{pid}-{n}", f"tu{pid}x{n}a", f"tu{pid}x{n}b", host_addr, peer_addr)
    steps = [
        [ip, "netns", "add", link.ns],
        [ip, "link", "add", link.host_if, "type", "veth", "peer", "name", link.peer_if, "netns", link.ns],
        [ip, "addr", "add", f"{host_addr}/30", "dev", link.host_if],
        [ip, "link", "set", link.host_if, "up"],
        [ip, "-n", link.ns, "addr", "add", f"{peer_addr}/30", "dev", link.peer_if],
        [ip, "-n", link.ns, "link", "set", link.peer_if, "up"],
        [ip, "-n", link.ns, "link", "set", "lo", "up"],
    ]
    for argv in steps:
        proc = run(*argv, check=False)
        if proc.returncode != 0:
            link.remove()
            return link, [f"{' '.join(argv[1:])}: {proc.stderr.strip()}"]
    return link, []


@contextlib.contextmanager
def veth_link() -> Iterator[VethLink]:
    """A :class:`VethLink`, removed afterwards however the test ended (use it from a fixture)."""
    link, errors = make_link()
    if errors:
        unavailable(f"cannot make a network namespace with a veth pair: {errors[0]}")
    try:
        yield link
    finally:
        link.remove()
