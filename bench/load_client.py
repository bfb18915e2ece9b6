"""Requests at a fixed rate from a process of its own: ``python -m bench.load_client URL RATE
SECONDS``. Prints the latency of each request in milliseconds, as a JSON list."""

from __future__ import annotations

import json
import sys
import time

import httpx


def main() -> None:
    url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    latencies = []
    with httpx.Client(trust_env=False) as client:
        client.get(url)  # open the connection first
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            # Open loop: each request goes out at its own time, not after the last answer.
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.monotonic()
            response = client.get(url)
            latencies.append((time.monotonic() - sent) * 1000)
            assert response.status_code in (200, 503), response.status_code
    json.dump(latencies, sys.stdout)


if __name__ == "__main__":
    main()
