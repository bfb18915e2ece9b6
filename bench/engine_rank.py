"""``python -m bench.engine_rank --port P [--allocate MIB]``: a rank shaped like vLLM's.

The process the supervisor starts serves HTTP (the demo server) and starts one child, the
"engine", which renames itself ``VLLM::EngineCore`` with setproctitle (as vLLM's engine core
does; it overwrites what /proc shows of the environment, tree cookie included) and holds the
GPU memory. Nothing in the API process touches the GPU. Needs torch and setproctitle.
"""

from __future__ import annotations

import os
import subprocess
import sys

from trio_dpsup.demo import DemoServer, build_parser, serve

ENGINE = """
import sys, time
import setproctitle
setproctitle.setproctitle("VLLM::EngineCore")
from trio_dpsup.demo import allocate_gpu_memory
held = allocate_gpu_memory(int(sys.argv[1]))
print("holding", flush=True)
time.sleep(3600)
"""


def main() -> None:
    args = build_parser("python -m bench.engine_rank").parse_args()
    engine = subprocess.Popen(
        [sys.executable, "-c", ENGINE, str(args.allocate or 2048)], stdout=subprocess.PIPE
    )
    assert engine.stdout is not None
    engine.stdout.readline()  # "holding": healthy only once the engine has its memory
    print(f"engine pid {engine.pid} holds its memory", file=sys.stderr, flush=True)
    server = DemoServer(args.host, args.port, args.health_path, args.ready_after, args.api_key)
    serve(server)
    os._exit(0)  # as vLLM's API server: the engine is left to the supervisor's tree kill


if __name__ == "__main__":
    main()
