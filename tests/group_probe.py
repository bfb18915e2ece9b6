"""A poller of members' /ready, run inside a simulated node (tests/netns.py), for the group
tests: ``python tests/group_probe.py --max-seconds S URL...``.

It writes "polling" once it has had a first answer from every URL, then polls each URL's
/ready every `INTERVAL` seconds and writes one JSON line per URL the first time it answers
anything but 200 (or nothing): ``{"url": URL, "out": T}``, T on CLOCK_MONOTONIC (one clock
for every namespace of the machine, the test's too). It exits once every URL is out, or
after --max-seconds. Standard library only: it starts fast in any node.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from urllib.parse import urlsplit

#: Seconds between two rounds of polls, and the bound of one poll.
INTERVAL = 0.02
TIMEOUT = 0.2


def ready(url: str) -> bool:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args()
    end = time.monotonic() + args.max_seconds
    waiting = list(args.urls)
    for url in args.urls:
        if not ready(url):
            print(json.dumps({"url": url, "not_ready_at_start": True}), flush=True)
            sys.exit(1)
    print("polling", flush=True)
    while waiting and time.monotonic() < end:
        for url in list(waiting):
            if not ready(url):
                print(json.dumps({"url": url, "out": time.monotonic()}), flush=True)
                waiting.remove(url)
        time.sleep(INTERVAL)  # a poll's period, not a wait for something to happen
    sys.exit(0 if not waiting else 1)


if __name__ == "__main__":
    main()
