"""Free TCP ports that nothing else on the machine is about to take.

A port the kernel hands out for `bind(0)` comes from the ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), the same range every outgoing
connection and every other `bind(0)` draws from: between our probe closing it and the real server
binding it, a Ray started beside us (its raylet, object manager and agents pick their ports that
way) or any client connection can take it. CI saw exactly that: a test's head failed with
`Failed to bind to address 127.0.0.1:36471`. So ports are drawn at random below the ephemeral
range and above Ray's worker ports (10002-19999 by default), and probed before they are returned.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999  # `ray start --max-worker-port` default
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (Linux's default where it cannot be read)."""
    try:
        low, high = (int(x) for x in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def candidate_range() -> range:
    """Ports neither Ray's workers nor the kernel hand out: (19999, ephemeral low)."""
    low, _ = ephemeral_range()
    if low - RAY_WORKER_PORTS_END > 1000:
        return range(RAY_WORKER_PORTS_END + 1, low)
    return range(1024 + 1, RAY_WORKER_PORTS_END - 10000)  # an unusual kernel setting


def bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports that `host` can bind now, drawn outside the ephemeral range."""
    candidates = candidate_range()
    chosen: list[int] = []
    for port in random.sample(candidates, min(len(candidates), 50 * n + 100)):
        if port not in chosen and bindable(port, host):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise RuntimeError(
        f"found only {len(chosen)} of {n} free ports in {candidates.start}-{candidates.stop - 1} "
        f"on {host or 'all addresses'}: something holds most of them"
    )


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


if __name__ == "__main__":  # cluster/local-head.sh: one free port
    import sys

    sys.stdout.write(f"{free_port()}\n")
