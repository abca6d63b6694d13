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
from typing import NamedTuple

__all__ = ["WireBytes", "read_local", "read_namespace"]


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
