"""Hosts as network namespaces: creation, removal (also of a crashed run's leftovers), address guard.

Topology: each host is a namespace ``hsq-<pid>-h<i>`` with one interface ``eth0`` holding its own
address in a private subnet; the other end of each host's veth pair sits in a switch namespace
``hsq-<pid>-sw`` and is enslaved to a bridge there. The switch namespace is not connected to the
machine's own network, so nothing sent inside the cluster can leave it.

A cluster with latency (``latency_ms > 0``) has no bridge: this kernel has no ``netem``, so each
host's ``eth0`` is a TUN device whose other end is :mod:`benchmarks.cluster.delay_link`, a switch
process in the switch namespace that delivers every packet that many milliseconds late.

Names carry the creating process's id: a later run removes only sets whose creator is gone, so two
runs (a benchmark and the tests) never remove each other's hosts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import pathlib
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
from typing import Iterator

__all__ = ["PREFIX", "Host", "Cluster", "ForeignAddressError", "require_root", "create_cluster",
           "remove_cluster", "remove_stale", "cluster", "terminate_on_signals", "DEFAULT_SUBNET"]

PREFIX = "hsq-"
DEFAULT_SUBNET = "10.213.0.0/24"
MAX_HOSTS = 8
HOST_IFACE = "eth0"
BRIDGE = "br0"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-(sw|h\d+)$")
# ``ip netns exec NAME`` bind-mounts files in /etc/netns/NAME/ over /etc: a per-host /etc/hosts.
_NETNS_ETC = pathlib.Path("/etc/netns")


class ForeignAddressError(ValueError):
    """An address that belongs to no host of this cluster: the harness never sends there."""


@dataclasses.dataclass(frozen=True)
class Host:
    """One host of the cluster: its namespace, interface and address."""

    rank: int
    namespace: str
    address: str
    iface: str = HOST_IFACE
    switch_port: str = ""  # the veth end on the bridge, in the switch namespace


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A set of hosts on one bridge; the only addresses the harness may send to."""

    switch: str
    hosts: tuple[Host, ...]
    subnet: str
    latency_ms: float = 0.0  # one way, between any two hosts

    @property
    def namespaces(self) -> list[str]:
        return [self.switch] + [host.namespace for host in self.hosts]

    def require_member(self, address: str) -> str:
        """Returns ``address`` if a host of this cluster owns it; raises :class:`ForeignAddressError`."""
        if address not in {host.address for host in self.hosts}:
            raise ForeignAddressError(
                f"refusing to target {address!r}: it belongs to no namespace this harness created "
                f"(hosts: {', '.join(h.address for h in self.hosts)})")
        return address

    def host_of(self, address: str) -> Host:
        self.require_member(address)
        return next(host for host in self.hosts if host.address == address)


def require_root() -> None:
    """Raises a clear error unless this process may create network namespaces."""
    if os.geteuid() != 0:
        raise PermissionError("needs root: creating network namespaces, veth pairs and tc qdiscs "
                              "requires CAP_SYS_ADMIN and CAP_NET_ADMIN (run with sudo)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise FileNotFoundError("needs iproute2: the `ip` and `tc` commands were not found "
                                "(apt-get install iproute2)")


def ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    """Runs ``ip [-n NAMESPACE] ARGS`` and returns its output; errors name the failed command."""
    command = ["ip"] + (["-n", namespace] if namespace else []) + list(args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_cluster(num_hosts: int, subnet: str = DEFAULT_SUBNET,
                   latency_ms: float = 0.0) -> Cluster:
    """Creates ``num_hosts`` hosts (removing stale sets first): on a bridge, or with
    ``latency_ms`` > 0 on a switch that delays every packet that long; unshaped links."""
    require_root()
    if not 2 <= num_hosts <= MAX_HOSTS:
        raise ValueError(f"num_hosts must be 2..{MAX_HOSTS}, got {num_hosts}")
    if not 0 <= latency_ms <= 10_000:
        raise ValueError(f"latency_ms must be within 0..10000, got {latency_ms!r}")
    network = ipaddress.ip_network(subnet)
    if not network.is_private or network.num_addresses < num_hosts + 2:
        raise ValueError(f"subnet must be a private network with room for {num_hosts} hosts, "
                         f"got {subnet}")
    remove_stale()
    base = f"{PREFIX}{os.getpid()}-"
    addresses = list(network.hosts())[:num_hosts]
    delayed = latency_ms > 0
    hosts = tuple(Host(rank, f"{base}h{rank}", str(addresses[rank]),
                       switch_port="" if delayed else f"p{rank}")
                  for rank in range(num_hosts))
    made = Cluster(f"{base}sw", hosts, subnet, float(latency_ms))
    try:
        ip("netns", "add", made.switch)
        for host in hosts:
            ip("netns", "add", host.namespace)
            ip("link", "set", "lo", "up", namespace=host.namespace)
            _write_hosts_file(host)
        if delayed:
            _delayed_links(made, network.prefixlen)
        else:
            ip("link", "add", BRIDGE, "type", "bridge", namespace=made.switch)
            ip("link", "set", BRIDGE, "up", namespace=made.switch)
            for host in hosts:
                _bridged_link(made, host, network.prefixlen)
    except BaseException:
        remove_cluster(made)
        raise
    return made


def _bridged_link(made: Cluster, host: Host, prefixlen: int) -> None:
    # Created directly inside the namespaces, so the machine's own interfaces are never touched.
    ip("link", "add", host.iface, "type", "veth", "peer", "name", host.switch_port,
       "netns", made.switch, namespace=host.namespace)
    ip("addr", "add", f"{host.address}/{prefixlen}", "dev", host.iface, namespace=host.namespace)
    ip("link", "set", host.iface, "up", namespace=host.namespace)
    ip("link", "set", host.switch_port, "master", BRIDGE, namespace=made.switch)
    ip("link", "set", host.switch_port, "up", namespace=made.switch)


# The delaying switch of each cluster with latency, by switch namespace.
_SWITCHES: dict[str, subprocess.Popen] = {}
_SWITCH_START_S = 30


def _delayed_links(made: Cluster, prefixlen: int) -> None:
    from benchmarks.cluster import delay_link

    repo = pathlib.Path(__file__).resolve().parents[2]
    switch = subprocess.Popen(
        ["ip", "netns", "exec", made.switch, sys.executable, "-m",
         "benchmarks.cluster.delay_link", f"{made.latency_ms:g}", str(len(made.hosts))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)})
    _SWITCHES[made.switch] = switch
    try:
        ready = switch.stdout.readline() if _readable(switch.stdout, _SWITCH_START_S) else ""
    except OSError:
        ready = ""
    if ready.strip() != "ready":
        raise RuntimeError(f"the delaying switch did not start (it printed {ready!r})")
    for host in made.hosts:
        device = delay_link.device_name(host.rank)
        ip("link", "set", device, "netns", host.namespace, namespace=made.switch)
        ip("link", "set", device, "name", host.iface, namespace=host.namespace)
        ip("link", "set", host.iface, "mtu", str(delay_link.MTU), namespace=host.namespace)
        ip("addr", "add", f"{host.address}/{prefixlen}", "dev", host.iface,
           namespace=host.namespace)
        ip("link", "set", host.iface, "up", namespace=host.namespace)
    switch.stdin.write("".join(f"{host.address}\n" for host in made.hosts))
    switch.stdin.flush()


def _readable(stream, timeout_s: float) -> bool:
    return bool(select.select([stream], [], [], timeout_s)[0])


def _write_hosts_file(host: Host) -> None:
    # Horovod 0.28.1 builds its per-process-set Gloo contexts from the hostname, not from
    # HOROVOD_GLOO_IFACE; inside the namespace the hostname must resolve to the host's address.
    etc = _NETNS_ETC / host.namespace
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{host.address} {socket.gethostname()}\n")


def remove_cluster(made: Cluster) -> None:
    """Kills what still runs in the cluster's namespaces and removes them (links go with them)."""
    for namespace in made.namespaces:
        _remove_namespace(namespace)
    switch = _SWITCHES.pop(made.switch, None)
    if switch is not None:  # killed with its namespace; reaped here
        switch.kill()
        switch.wait()


def _remove_namespace(namespace: str) -> None:
    if namespace in _namespaces():
        for pid in ip("netns", "pids", namespace, check=False).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", namespace, check=False)
    shutil.rmtree(_NETNS_ETC / namespace, ignore_errors=True)


def remove_stale() -> list[str]:
    """Removes namespaces of this harness whose creating process is gone; returns their names."""
    stale = []
    candidates = set(_namespaces())
    if _NETNS_ETC.is_dir():
        candidates |= {path.name for path in _NETNS_ETC.iterdir()}
    for namespace in sorted(candidates):
        match = _NAME.match(namespace)
        if match and not _pid_alive(int(match.group(1))):
            _remove_namespace(namespace)
            stale.append(namespace)
    return stale


def terminate_on_signals() -> None:
    """Turns SIGTERM and SIGHUP into ``SystemExit``, and Ctrl-C into ``KeyboardInterrupt`` even
    where it was inherited as ignored (a job started in the background), so ``finally`` blocks
    remove the namespaces."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def cluster(num_hosts: int, subnet: str = DEFAULT_SUBNET,
            latency_ms: float = 0.0) -> Iterator[Cluster]:
    """A cluster for the ``with`` block, removed on exit, on Ctrl-C and on failure."""
    made = create_cluster(num_hosts, subnet, latency_ms)
    try:
        yield made
    finally:
        remove_cluster(made)
