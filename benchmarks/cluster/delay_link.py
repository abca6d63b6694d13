"""Links with latency where the kernel has no ``netem``: TUN devices and a switch that waits.

``python -m benchmarks.cluster.delay_link DELAY_MS N`` runs inside the cluster's switch namespace.
It creates N TUN devices ``t0`` .. ``t<N-1>`` there (the harness then moves each into its host,
names it ``eth0`` and gives it the host's address) and forwards every IPv4 packet a host sends to
the host that owns its destination address, ``DELAY_MS`` after it arrived. The delay is the same
for every packet, so one queue in arrival order is also in order of departure.

The devices are not persistent: they vanish with this process, which the harness kills with the
switch namespace. Bandwidth is still ``tc tbf`` on each host's ``eth0`` (what it sends); with one
queue of whole packets, the switch adds nothing but the delay. Packets of no known host (IPv6
router solicitations, for one) are dropped.
"""
from __future__ import annotations

import collections
import fcntl
import os
import selectors
import struct
import sys
import time

__all__ = ["MTU", "device_name", "open_tun"]

# The largest IPv4 packet: TCP then sends few, large segments, which keeps a Python switch
# fast enough for 1 Gbit/s (about 2,000 packets a second per direction).
MTU = 65535
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_READS_PER_WAKE = 64


def device_name(rank: int) -> str:
    return f"t{rank}"


def open_tun(name: str) -> int:
    """A non-blocking file descriptor of a new TUN device ``name`` (IP packets, no header)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _destination(packet: bytes) -> bytes | None:
    """An IPv4 packet's destination address (4 bytes), or ``None`` for anything else."""
    return packet[16:20] if len(packet) >= 20 and packet[0] >> 4 == 4 else None


def serve(delay_s: float, fds: list[int], addresses: list[bytes]) -> None:
    """Forwards packets between ``fds`` (host ``i``'s device, owning ``addresses[i]``) forever."""
    route = dict(zip(addresses, fds))
    selector = selectors.DefaultSelector()
    for fd in fds:
        selector.register(fd, selectors.EVENT_READ)
    queue: collections.deque[tuple[float, int, bytes]] = collections.deque()
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        for key, _ in selector.select(timeout):
            for _ in range(_READS_PER_WAKE):
                try:
                    packet = os.read(key.fd, MTU)
                except BlockingIOError:
                    break
                target = route.get(_destination(packet))
                if target is not None:
                    queue.append((time.monotonic() + delay_s, target, packet))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, target, packet = queue.popleft()
            try:
                os.write(target, packet)
            except (BlockingIOError, OSError):
                pass  # the receiving host's backlog is full: dropped, as a switch would


def main(argv: list[str]) -> None:
    delay_ms, count = float(argv[0]), int(argv[1])
    fds = [open_tun(device_name(rank)) for rank in range(count)]
    print("ready", flush=True)
    # The harness names each host's address once the devices are in their namespaces.
    addresses = [bytes(int(part) for part in line.split(".")) for line in
                 (sys.stdin.readline().strip() for _ in range(count))]
    serve(delay_ms / 1000.0, fds, addresses)


if __name__ == "__main__":
    main(sys.argv[1:])
