"""Link shaping: a token bucket (``tc tbf``) for bandwidth; latency belongs to the cluster.

On a bridged cluster each host's link is shaped in both directions, like a full-duplex NIC: the
host's ``eth0`` limits what it sends, the switch's port limits what it receives. A cluster with
latency (see :mod:`benchmarks.cluster.delay_link`) delays every packet ``delay_ms`` one way in its
switch, and shapes what each host sends.
"""
from __future__ import annotations

import dataclasses
import subprocess

from benchmarks.cluster.namespaces import Cluster

__all__ = ["LinkShape", "parse_rate", "parse_shape", "shape_cluster", "describe"]

# tbf needs a bucket of at least one segment: with segmentation offload a veth sends up to 64 KiB
# at once, and a smaller bucket would drop every large packet.
_MIN_BURST_BYTES = 128 * 1024
# ... and enough tokens for one timer tick at high rates (2 ms covers HZ=500 and up).
_BURST_SECONDS = 0.002
_QUEUE_LATENCY_MS = 100


@dataclasses.dataclass(frozen=True)
class LinkShape:
    """Bandwidth in Mbit/s (``None``: unshaped) and added one-way latency in milliseconds."""

    rate_mbit: float | None = None
    delay_ms: float = 0.0

    @property
    def label(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else (
            f"{self.rate_mbit / 1000:g} Gbit/s" if self.rate_mbit >= 1000
            else f"{self.rate_mbit:g} Mbit/s")
        return rate + (f", +{self.delay_ms:g} ms" if self.delay_ms else "")


def parse_rate(text: str) -> float | None:
    """``"100mbit"``, ``"1gbit"``, ``"10gbit"`` or ``"unshaped"`` to Mbit/s (``None`` if unshaped)."""
    value = text.strip().lower()
    if value in ("unshaped", "none", "0"):
        return None
    for suffix, scale in (("gbit", 1000.0), ("mbit", 1.0)):
        if value.endswith(suffix):
            return float(value[:-len(suffix)]) * scale
    raise ValueError(f"rate must look like 100mbit, 1gbit or unshaped, got {text!r}")


def parse_shape(text: str, delay_ms: float = 0.0) -> LinkShape:
    """``"1gbit"`` (with ``delay_ms``) or ``"1gbit+20ms"`` (its own one-way latency)."""
    rate, plus, delay = text.partition("+")
    if plus:
        if not delay.strip().lower().endswith("ms"):
            raise ValueError(f"latency must look like +20ms, got {text!r}")
        delay_ms = float(delay.strip()[:-2])
        if not delay_ms >= 0:
            raise ValueError(f"latency must be non-negative, got {text!r}")
    return LinkShape(parse_rate(rate), delay_ms)


def _tc(namespace: str, *args: str) -> None:
    command = ["ip", "netns", "exec", namespace, "tc", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


def _shape_egress(namespace: str, iface: str, rate_mbit: float | None) -> None:
    # Start from the default qdisc so re-shaping a link never stacks qdiscs.
    subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", iface, "root"],
                   capture_output=True, timeout=30)
    if rate_mbit is not None:
        burst = max(_MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 * _BURST_SECONDS))
        _tc(namespace, "qdisc", "add", "dev", iface, "root", "handle", "10:", "tbf",
            "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{_QUEUE_LATENCY_MS}ms")


def shape_cluster(made: Cluster, shape: LinkShape) -> None:
    """Shapes every host's link to ``shape``'s rate (unshaped removes the limits): both directions
    on a bridged cluster, what each host sends on a delayed one. The latency is the cluster's
    own (``namespaces.cluster(..., latency_ms=...)``) and must be ``shape``'s."""
    if shape.delay_ms != made.latency_ms:
        raise ValueError(f"{shape.label} needs a cluster with {shape.delay_ms:g} ms latency; "
                         f"this one has {made.latency_ms:g} ms")
    for host in made.hosts:
        _shape_egress(host.namespace, host.iface, shape.rate_mbit)
        if host.switch_port:
            _shape_egress(made.switch, host.switch_port, shape.rate_mbit)


def describe(namespace: str, iface: str) -> str:
    """``tc qdisc show`` of one interface (for logs and tests)."""
    return subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "show", "dev", iface],
                          capture_output=True, text=True, timeout=30).stdout
