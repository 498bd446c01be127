"""RemoteHost: a network namespace that plays a remote machine, with its own address and its own
servers (sshd, echo), reached through a veth pair; it can lose its link or sit behind a jump host."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from typing import Optional, Sequence

from . import netns
from .echo import EchoServer
from .owner import live_objects, marked_pids, new_mark, next_serial, reap_once, register, tagged_env, unregister
from .procs import kill_and_wait, run, stop_popen
from .sshd import SshServer

# Private range for namespaces; 10.213.N.0/24 with N picked free per RemoteHost.
NETNS_PREFIX = "10.213"


class RemoteHost:
    """A network namespace that plays a remote machine: its own address, reached through a veth pair.

    The host side of the pair has `gateway_address` (.1), the namespace side `address` (.2) in a
    10.213.N.0/24 that no interface uses yet. The namespace has no default route, so nothing in it
    reaches beyond that /24 and its own loopback.
    """

    def __init__(self) -> None:
        self.name, self.host_ifname, self.peer_ifname = netns.names(next_serial())
        self.subnet: Optional[int] = None
        self.sshd: Optional[SshServer] = None
        self.echo: Optional[EchoServer] = None
        self._children: list = []
        self._procs: list[subprocess.Popen] = []
        self._created = False
        self.mark = new_mark()
        register(self)

    @property
    def address(self) -> str:
        """The namespace's own address (where its services listen)."""
        return f"{NETNS_PREFIX}.{self._require_subnet()}.2"

    @property
    def gateway_address(self) -> str:
        """Our side of the veth pair: how processes in the namespace reach the test process."""
        return f"{NETNS_PREFIX}.{self._require_subnet()}.1"

    def _require_subnet(self) -> int:
        if self.subnet is None:
            raise RuntimeError("RemoteHost is not started")
        return self.subnet

    def _pick_subnet(self) -> int:
        used = set()
        for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
            used.update(int(n) for n in re.findall(NETNS_PREFIX.replace(".", r"\.") + r"\.(\d+)\.", run(argv).stdout))
        # Rotate the start so back-to-back namespaces do not reuse an address that just went away.
        start = (os.getpid() * 7 + next_serial()) % 254
        for i in range(254):
            n = (start + i) % 254 + 1
            if n not in used:
                return n
        raise RuntimeError(f"no free /24 left in {NETNS_PREFIX}.0.0/16")

    def start(self) -> "RemoteHost":
        if self._created:
            return self
        reason = netns.netns_unavailable_reason()
        if reason:
            raise netns.NetnsUnavailable(reason)
        reap_once()
        with netns.lock():
            netns.remove_stale()
            if self.name in netns.netns_names() or self.host_ifname in netns.link_names():
                # Left by an earlier process with our pid that crashed.
                netns.destroy(self.name, self.host_ifname)
            self.subnet = self._pick_subnet()
            self._created = True
            try:
                self._create()
            except BaseException:
                self.close()
                raise
        return self

    def _create(self) -> None:
        n, gw, addr = self.name, self.gateway_address, self.address
        for argv in (
            ["ip", "netns", "add", n],
            ["ip", "link", "add", self.host_ifname, "type", "veth", "peer", "name", self.peer_ifname, "netns", n],
            ["ip", "addr", "add", f"{gw}/24", "dev", self.host_ifname],
            ["ip", "link", "set", self.host_ifname, "up"],
            ["ip", "-n", n, "link", "set", "lo", "up"],
            ["ip", "-n", n, "addr", "add", f"{addr}/24", "dev", self.peer_ifname],
            ["ip", "-n", n, "link", "set", self.peer_ifname, "up"],
        ):
            run(argv)

    @property
    def ssh_servers(self) -> list[SshServer]:
        return [c for c in self._children if isinstance(c, SshServer)]

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        return [*netns.exec_prefix(self.name), *argv]

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run inside the namespace (timeout defaults to 30 s)."""
        kwargs.setdefault("timeout", 30.0)
        kwargs["env"] = tagged_env(self.mark, kwargs.get("env"))
        return subprocess.run(self.netns_argv(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen inside the namespace; stopped by close() if still running."""
        kwargs["env"] = tagged_env(self.mark, kwargs.get("env"))
        proc = subprocess.Popen(self.netns_argv(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one."""
        res = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def link_down(self) -> None:
        """Cut the link from the far side: our routes stay, packets to the namespace vanish silently,
        as when a remote machine or the network beyond the first hop dies."""
        run(["ip", "-n", self.name, "link", "set", self.peer_ifname, "down"])

    def link_up(self) -> None:
        run(["ip", "-n", self.name, "link", "set", self.peer_ifname, "up"])

    def move_behind(self, jump: "RemoteHost", reach: Sequence[str] = ()) -> None:
        """Make this host reachable only through `jump`, like a machine behind a bastion.

        Our end of the veth pair moves into the jump host's namespace, so the test process (the gateway's
        side) has no route here at all, while the jump host reaches `address` directly. Traffic from here
        to the addresses in `reach` (e.g. a gateway's response address) goes out through the jump host,
        which masquerades it as its own, as NAT on a real bastion would.
        """
        gw = self.gateway_address
        run(["ip", "link", "set", self.host_ifname, "netns", jump.name])
        jump.run(["ip", "addr", "add", f"{gw}/24", "dev", self.host_ifname], check=True, capture_output=True)
        jump.run(["ip", "link", "set", self.host_ifname, "up"], check=True, capture_output=True)
        if reach:
            jump.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, capture_output=True)
            jump.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{self.address}/32",
                      "-o", jump.peer_ifname, "-j", "MASQUERADE"], check=True, capture_output=True)  # fmt: skip
        for address in reach:
            self.run(["ip", "route", "add", f"{address}/32", "via", gw], check=True, capture_output=True)
            if not address.startswith(f"{NETNS_PREFIX}.{jump.subnet}."):
                jump.run(["ip", "route", "add", f"{address}/32", "via", jump.gateway_address], check=True, capture_output=True)

    def ssh_server(self, **kwargs) -> SshServer:
        """Start an SshServer inside the namespace, listening on `address` (the first becomes .sshd)."""
        kwargs.setdefault("host", self.address)
        server = SshServer(netns=self.name, **kwargs).start()
        self._children.append(server)
        if self.sshd is None:
            self.sshd = server
        return server

    def echo_server(self, port: int = 0, *, mode: str = "echo", host: Optional[str] = None) -> EchoServer:
        """Start a TCP service inside the namespace (default on `address`; the first echo becomes .echo)."""
        server = EchoServer(host or self.address, port, mode=mode, netns=self.name).start()
        self._children.append(server)
        if self.echo is None and mode == "echo":
            self.echo = server
        return server

    def close(self) -> None:
        for child in reversed(self._children):
            with contextlib.suppress(Exception):
                child.close()
        self._children.clear()
        for proc in self._procs:
            stop_popen(proc)
        self._procs.clear()
        if self._created:
            self._created = False
            kill_and_wait(marked_pids(self.mark))
            netns.destroy(self.name, self.host_ifname)
        unregister(self)

    @property
    def created(self) -> bool:
        """Whether the namespace exists (started and not yet closed)."""
        return self._created

    def __enter__(self) -> "RemoteHost":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        addr = self.address if self.subnet is not None else "-"
        return f"<RemoteHost {self.name} {addr}>"


def live_hosts() -> list[RemoteHost]:
    """Every namespace host this process has started and not closed, oldest first: what a check for
    leftovers on "remote hosts" has to look at, whichever fixture or test made them."""
    return [o for o in live_objects() if isinstance(o, RemoteHost) and o.created]
