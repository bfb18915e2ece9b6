"""``python -m bench.tree_walk_torch [N]``: what a tree-watch walk costs over ranks that are
real CUDA torch processes, with the threads torch starts (needs torch and a GPU).

Starts N processes (default 8) that initialise CUDA, put a tensor on the GPU and run a CPU
matmul (which starts torch's OpenMP pool), then times `Trees.walk` asking every thread of
each process for its children and asking its main thread only: in a tight loop, and once a
second as the tree watch runs it (caches cold between rounds). Prints the figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from trio_dpsup._proc.membership import Trees  # the walk itself is what this times

_RANK = """
import time
import torch
torch.cuda.init()
x = torch.randn(2048, 2048, device="cuda")
torch.cuda.synchronize()
a = torch.randn(512, 512)
(a @ a).sum()
print("up", flush=True)
time.sleep(600)
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK], stdout=subprocess.PIPE, start_new_session=True
        )
        for _ in range(n)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"up"
        threads = [len(os.listdir(f"/proc/{proc.pid}/task")) for proc in procs]
        print(f"{n} CUDA torch ranks, threads each: {threads} (os.cpu_count() = {os.cpu_count()})")
        trees = Trees("bench")
        for rank, proc in enumerate(procs):
            trees.add_root(rank, proc.pid)
        for every in (True, False):
            rounds = 200
            start = time.process_time()
            for _ in range(rounds):
                trees.walk(every_thread=every)
            per = (time.process_time() - start) / rounds * 1e6
            print(f"walk, every_thread={every}: {per:.0f} us a round (hot cache)")
        for every in (True, False):
            rounds, spent = 20, 0.0
            for _ in range(rounds):
                start = time.process_time()
                trees.walk(every_thread=every)
                spent += time.process_time() - start
                time.sleep(1.0)  # the tree watch's interval: caches go cold between rounds
            per = spent / rounds * 1e6
            print(f"walk once a second, every_thread={every}: {per:.0f} us a round")
    finally:
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    main()
