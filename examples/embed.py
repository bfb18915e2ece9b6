"""Embed trio_dpsup in a Trio program: start two demo ranks, wait, use them, shut down."""

import sys

import httpx
import trio

from trio_dpsup import Supervisor, SupervisorConfig, SupervisorHandle


async def main(base_port: int) -> int:
    config = SupervisorConfig(
        command=(sys.executable, "-m", "trio_dpsup.demo", "--port", "{port}"),
        ranks=2,
        gpus_per_rank=0,  # the demo needs no GPU; a real server: 1 or more, with --devices
        base_port=base_port,
        control_port=0,  # any free port; the handle says which
    )
    async with trio.open_nursery() as nursery:
        # nursery.start returns Any (trio cannot type it): name what it is.
        handle: SupervisorHandle = await nursery.start(Supervisor(config).run)
        await handle.wait_ready()
        async with httpx.AsyncClient() as client:
            for rank in handle.status().ranks:
                reply = await client.get(f"http://127.0.0.1:{rank.port}/")
                print(f"rank {rank.rank} (pid {rank.pid}) says {reply.json()}")
        handle.request_shutdown()
        return await handle.wait_stopped()


if __name__ == "__main__":
    sys.exit(trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8000))
