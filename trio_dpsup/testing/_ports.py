"""Free loopback ports for tests, chosen outside the kernel's ephemeral range.

Outgoing connections (the prober's among them) take ephemeral ports, so a rank port picked
there could be taken between the check and the rank's bind.
"""

from __future__ import annotations

import random
import socket

__all__ = ["free_port_range"]

# Below Linux's default ephemeral range (32768-60999), above the well-known services.
_LOW, _HIGH = 20000, 32000
_ATTEMPTS = 200


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive ports that are free on `host` right now."""
    rng = random.Random()
    for _ in range(_ATTEMPTS):
        base = rng.randrange(_LOW, _HIGH - count)
        if all(_is_free(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {_LOW}-{_HIGH}")


def _is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
