"""Bytes on the wire: the kernel's counters of a host's interface.

The counters include every header (Ethernet, IP, TCP) and every message of every protocol on the
link, so the difference to the payload bytes is the protocol overhead. Ranks read their own host's
counters directly (they run inside its namespace, where ``ip netns exec`` mounted a matching
``/sys``); the harness reads any host's from outside.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import time
from typing import NamedTuple

__all__ = ["WireBytes", "read_local", "read_namespace", "unacknowledged_bytes", "wait_drained"]

_DRAIN_POLL_S = 0.002


class WireBytes(NamedTuple):
    """Bytes sent and received by one interface (cumulative, or a difference of two readings)."""

    sent: int
    received: int

    def __sub__(self, earlier: "WireBytes") -> "WireBytes":  # type: ignore[override]
        return WireBytes(self.sent - earlier.sent, self.received - earlier.received)


def read_local(iface: str = "eth0") -> WireBytes:
    """Counters of ``iface`` in the caller's own network namespace (cheap: two sysfs reads)."""
    stats = pathlib.Path("/sys/class/net") / iface / "statistics"
    return WireBytes(int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text()))


def read_namespace(namespace: str, iface: str) -> WireBytes:
    """Counters of ``iface`` in ``namespace``, read from outside it."""
    done = subprocess.run(["ip", "-n", namespace, "-s", "-j", "link", "show", "dev", iface],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"cannot read counters of {iface} in {namespace}: {done.stderr.strip()}")
    stats = json.loads(done.stdout)[0]["stats64"]
    return WireBytes(int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"]))



def unacknowledged_bytes() -> int:
    """Bytes the caller's namespace wrote to TCP sockets that the peers have not acknowledged yet.

    The interface counters count a byte when it leaves the interface (after the shaper's queue),
    not when a process writes it: a collective can return while what this rank sent last still
    waits in its socket or in the shaper's queue (up to the queue's 100 ms at the link rate).
    Once every socket's send queue is empty, every byte written has left the interface.
    """
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 4:
                total += int(fields[4].split(":")[0], 16)  # tx_queue:rx_queue
    return total


def wait_drained(timeout_s: float = 2.0) -> bool:
    """Waits until :func:`unacknowledged_bytes` is 0; ``False`` if ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    while unacknowledged_bytes() > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(_DRAIN_POLL_S)
    return True
