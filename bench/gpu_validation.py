"""``python -m bench.gpu_validation OUT.md``: the supervisor on real GPUs, written up as a record.

Needs NVML, two or more GPUs and torch (the demo rank's ``--allocate``). Runs the CLI as a
user would, one rank per GPU, and records for each scenario the command, what /status said
and what NVML saw:

1. placement: each rank on its own GPU with its memory; placement ok; SIGTERM; no leftovers;
2. a rank deliberately started on the wrong GPU is flagged;
3. the supervisor SIGKILLed: its ranks' GPU memory is released within seconds;
4. a process outside the trees holding GPU memory is reported after shutdown, and
   ``--fail-on-leftovers`` turns it into exit status 1;
5. ranks shaped like vLLM's (bench/engine_rank.py): the GPU memory is held by a child that
   renamed itself with setproctitle (so /proc no longer shows its tree cookie): placement
   is ok while they run, and after a SIGKILL of the supervisor NVML shows none of their
   processes within a second (with and without --cgroups, where cgroups are writable);
6. a vLLM-shaped rank under ``--restart on-failure`` whose main process is SIGKILLed: its
   engine child's memory is released before the new process starts (NVML polled every
   5 ms never shows the old and the new engine at once), and the GPU ends with exactly one
   holder;
7. a stalled rank (busy, its progress counter stopped) on a GPU: its evidence folder, with
   the py-spy stacks of its tree;
8. a real engine, llama.cpp's llama-server built with CUDA (``--preset llama-cpp``, every
   layer on the GPU with ``-ngl 99``, a random model written at run time): its GPU memory
   held while ready and placement ok; a rank SIGKILLed under ``--restart on-failure``
   (NVML polled every 5 ms: never the old and the new engine at once, one holder after);
   SIGTERM; then the supervisor SIGKILLed: the memory freed each time.

``--only 6,7,8`` runs those alone (one GPU is enough for them). Scenario 8 takes the
llama-server of ``$TRIO_DPSUP_LLAMA_SERVER``, or of ``python -m trio_dpsup.testing.llama_cpp
--cuda-arch 90``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from trio_dpsup import open_pynvml
from trio_dpsup.testing import (
    CliSupervisor,
    Fault,
    free_port_range,
    inject_fault,
    open_cli_supervisor,
)

PY = sys.executable
DEMO = (PY, "-m", "trio_dpsup.demo", "--port", "{port}", "--allocate", "2048")


class Record:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def block(self, text: str, lang: str = "") -> None:
        self.add(f"```{lang}")
        self.add(text.rstrip())
        self.add("```")


def nvml_processes() -> dict[str, list[tuple[int, int]]]:
    """Every GPU's compute processes, (pid, MiB), straight from NVML."""
    backend = open_pynvml()
    try:
        return {
            g.uuid: [(p.pid, (p.used_memory or 0) >> 20) for p in backend.processes(g.uuid)]
            for g in backend.inventory()
        }
    finally:
        backend.close()


def summary(status: dict[str, Any]) -> str:
    rows = []
    for rank in status["ranks"]:
        gpus = ", ".join(
            f"GPU {g['index']} {g['uuid'][:12]}… {g['memory_used_mib']}/{g['memory_total_mib']} "
            f"MiB, {g['utilization_pct']}%, {g['temperature_c']} C, {g['power_w']} W"
            for g in rank["gpus"]
        )
        issues = "; ".join(i["text"] for i in rank["placement"]["issues"]) or "-"
        rows.append(
            f"rank {rank['rank']} pid {rank['pid']} state {rank['state']} | {gpus} | "
            f"placement {rank['placement']['verdict']} | {issues}"
        )
    return "\n".join(rows)


async def wait_status(
    sup: CliSupervisor, condition: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Read /status until `condition` holds; fail after a minute."""
    url = await sup.control_url()
    async with httpx.AsyncClient() as client:
        with trio.fail_after(60):
            while True:
                status: dict[str, Any] = (await client.get(f"{url}/status")).json()
                if condition(status):
                    return status
                await trio.sleep(0.2)  # pacing the reads; the condition is what we wait for


def verdicts(*expected: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: [r["placement"]["verdict"] for r in s["ranks"]] == list(expected)


def cli(ranks: int, *options: str, command: tuple[str, ...] = DEMO) -> list[str]:
    base = free_port_range(ranks)
    return [
        "--ranks", str(ranks), "--base-port", str(base), "--control-port", "0",
        "--gpu-interval", "1", "--grace-period", "10", "--startup-timeout", "300",
        *options, "--", *command,
    ]  # fmt: skip


async def kill_and_wait_released(
    sup: CliSupervisor, before: dict[str, list[tuple[int, int]]], *, pacing: float
) -> tuple[dict[str, list[tuple[int, int]]], float]:
    """SIGKILL the supervisor; wait (10 s at most) until NVML lists no process. Returns what
    NVML listed last and the seconds from the SIGKILL to then."""
    killed_at = trio.current_time()
    sup.send_signal(signal.SIGKILL)
    with trio.fail_after(60):
        await sup.wait()
    left = before
    with trio.move_on_after(10):
        while any(left.values()):
            left = await trio.to_thread.run_sync(nvml_processes)
            await trio.sleep(pacing)  # pacing NVML reads
    return left, trio.current_time() - killed_at


async def scenario_placement(record: Record, ranks: int) -> None:
    args = cli(ranks)
    record.add("## 1. One rank per GPU: placement, readings, clean shutdown, no leftovers")
    record.block("python -m trio_dpsup " + shlex.join(args), "sh")
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        status = await wait_status(sup, verdicts(*["ok"] * ranks))
        record.add("/status once placement was checked (summary, then the JSON of rank 0):")
        record.block(summary(status))
        record.block(json.dumps(status["ranks"][0], indent=2), "json")
        record.add("NVML's own process list at that moment (uuid: [(pid, MiB)]):")
        record.block(json.dumps(await trio.to_thread.run_sync(nvml_processes), indent=1))
        sup.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            code = await sup.wait()
    record.add(f"SIGTERM -> exit status {code}. The supervisor's log:")
    record.block(sup.log)
    left = await trio.to_thread.run_sync(nvml_processes)
    record.add(f"NVML after exit: {json.dumps(left)}")
    assert code == 0, "placement scenario: not a clean exit"
    assert not any(left.values()), "placement scenario: GPU memory left held"


async def scenario_wrong_gpu(record: Record) -> None:
    # Rank 0 overrides its CUDA_VISIBLE_DEVICES and lands on GPU 1: what a wrapper script
    # with a hard-coded device, or a mis-set environment, does.
    command = (
        "sh", "-c",
        'if [ {local_rank} = 0 ]; then export CUDA_VISIBLE_DEVICES=1; fi; exec "$@"', "sh",
        *DEMO,
    )  # fmt: skip
    args = cli(2, command=command)
    record.add("## 2. A rank deliberately started on the wrong GPU")
    record.block("python -m trio_dpsup " + shlex.join(args), "sh")
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        status = await wait_status(sup, verdicts("misplaced", "misplaced"))
        record.block(summary(status))
        sup.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            code = await sup.wait()
    record.add(f"SIGTERM -> exit status {code}. Placement lines of the log:")
    record.block("\n".join(line for line in sup.lines if "placement" in line))


async def scenario_sigkill(record: Record) -> None:
    args = cli(2)
    record.add("## 3. The supervisor SIGKILLed: the ranks' GPU memory is released")
    record.block(
        "python -m trio_dpsup " + shlex.join(args) + "; then kill -KILL <supervisor>", "sh"
    )
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        await wait_status(sup, verdicts("ok", "ok"))
        before = await trio.to_thread.run_sync(nvml_processes)
        left, released = await kill_and_wait_released(sup, before, pacing=0.1)
    record.add(f"NVML before: {json.dumps(before)}")
    record.add(f"NVML {released:.2f} s after the SIGKILL: {json.dumps(left)}")
    assert not any(left.values()), "GPU memory outlived the supervisor"


async def scenario_leftovers(record: Record) -> None:
    holder = (
        "import torch, time; x = torch.empty(1024 << 20, dtype=torch.uint8, device='cuda'); "
        "print('holding', flush=True); time.sleep(600)"
    )
    stray = await trio.lowlevel.open_process(
        [PY, "-c", holder], env={"CUDA_VISIBLE_DEVICES": "0", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert stray.stdout is not None
        await stray.stdout.receive_some()  # "holding": the memory is taken
        args = cli(2, "--fail-on-leftovers")
        record.add("## 4. A process outside the trees holds memory on rank 0's GPU")
        record.add(f"pid {stray.pid}: a torch process holding 1 GiB on GPU 0, started first.")
        record.block("python -m trio_dpsup " + shlex.join(args), "sh")
        async with open_cli_supervisor(args) as sup:
            with trio.fail_after(300):
                await sup.wait_ready()
            status = await wait_status(sup, lambda s: s["ranks"][0]["placement"]["issues"] != [])
            record.block(summary(status))
            sup.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                code = await sup.wait()
        record.add(f"SIGTERM -> exit status {code} (with --fail-on-leftovers). The log's end:")
        record.block("\n".join(sup.lines[-4:]))
        assert code == 1, "leftovers did not fail the exit status"
    finally:
        stray.kill()
        await stray.wait()


def proc_name(pid: int) -> str:
    """What /proc shows of a process: its title, and whether its tree cookie is visible."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    cookie = b"TRIO_DPSUP_TREE" in Path(f"/proc/{pid}/environ").read_bytes()
    return title + (" (cookie visible)" if cookie else " (no cookie visible)")


async def scenario_renamed_engines(record: Record, *options: str) -> None:
    args = cli(2, *options, command=(PY, "-m", "bench.engine_rank", "--port", "{port}"))
    title = "with --cgroups" if options else "by session, group and registry"
    record.add(f"## 5. vLLM-shaped ranks whose engine child renamed itself ({title})")
    record.block(
        "python -m trio_dpsup " + shlex.join(args) + "; then kill -KILL <supervisor>", "sh"
    )
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        status = await wait_status(sup, verdicts("ok", "ok"))
        record.add("/status once placement was checked:")
        record.block(summary(status))
        before = await trio.to_thread.run_sync(nvml_processes)
        titles = {pid: proc_name(pid) for procs in before.values() for pid, _ in procs}
        record.add(f"NVML before: {json.dumps(before)}; their names in /proc: {titles}")
        left, released = await kill_and_wait_released(sup, before, pacing=0.05)
    record.add(f"NVML {released:.2f} s after the SIGKILL: {json.dumps(left)}")
    assert not any(left.values()), "renamed engines outlived the supervisor"
    assert released < 1.0, f"engines released their GPUs only after {released:.2f} s"


def rank_pid(status: dict[str, Any], rank: int = 0) -> int:
    return int(status["ranks"][rank]["pid"])


async def kill_rank_and_watch(
    sup: CliSupervisor, status: dict[str, Any], old: int
) -> tuple[list[tuple[float, list[tuple[int, int]]]], int]:
    """SIGKILL rank 0, whose engine is `old`, and poll NVML every 5 ms until another
    process holds memory: what NVML listed each time it changed ((pid, MiB), seconds after
    the kill), and the new holder. Fails if the old and a new engine are ever listed at
    once. NVML is held open: a poll is one NVML call, about a millisecond."""
    start = trio.current_time()
    os.kill(rank_pid(status), signal.SIGKILL)
    timeline: list[tuple[float, list[tuple[int, int]]]] = []
    new: int | None = None
    backend = open_pynvml()
    uuids = [g.uuid for g in backend.inventory()]
    try:
        with trio.fail_after(300):
            while new is None:
                procs = sorted(
                    (p.pid, (p.used_memory or 0) >> 20) for u in uuids for p in backend.processes(u)
                )
                if not timeline or timeline[-1][1] != procs:
                    timeline.append((trio.current_time() - start, procs))
                pids = [pid for pid, _ in procs]
                assert not (old in pids and len(pids) > 1), f"old and new engine at once: {pids}"
                new = next((pid for pid in pids if pid != old), None)
                await trio.sleep(0.005)  # pacing NVML reads
    finally:
        backend.close()
    return timeline, new


def restarted_once(status: dict[str, Any]) -> bool:
    rank = status["ranks"][0]
    return bool(
        rank["restarts"] == 1 and rank["state"] == "ready" and rank["placement"]["verdict"] == "ok"
    )


async def scenario_restart_after_sigkill(record: Record) -> None:
    engine = (PY, "-m", "bench.engine_rank", "--port", "{port}", "--allocate", "4096")
    args = cli(
        1, "--restart", "on-failure", "--restart-backoff-min", "0.1",
        "--restart-backoff-max", "0.1", command=engine,
    )  # fmt: skip
    record.add("## 6. A vLLM-shaped rank's main process SIGKILLed under --restart on-failure")
    record.add(
        "The engine child (renamed VLLM::EngineCore) holds 4 GiB; the API process is killed. "
        "NVML (held open) is polled every 5 ms from the kill until the new engine holds its memory."
    )
    record.block("python -m trio_dpsup " + shlex.join(args) + "; then kill -KILL <rank 0>", "sh")
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        status = await wait_status(sup, verdicts("ok"))
        before = await trio.to_thread.run_sync(nvml_processes)
        (old,) = [pid for procs in before.values() for pid, _ in procs]
        record.add(f"NVML before: {json.dumps(before)} (pid {old}: {proc_name(old)})")
        killed_at = datetime.datetime.now()
        timeline, new = await kill_rank_and_watch(sup, status, old)
        after = await wait_status(sup, restarted_once)
        end = await trio.to_thread.run_sync(nvml_processes)
        sup.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            code = await sup.wait()
    record.add("What NVML listed, each time it changed (wall clock, seconds after the SIGKILL):")
    record.block(
        "\n".join(
            f"{(killed_at + datetime.timedelta(seconds=t)).strftime('%H:%M:%S.%f')[:-3]} "
            f"(+{t:.3f} s): {[pid for pid, _ in procs]}"
            for t, procs in timeline
        )
    )
    record.add("The supervisor's log around the restart (its clock: the wall clock):")
    keep = ("exited unexpectedly", "restarts in", "GPU memory", "started: pid", "is ready")
    record.block("\n".join(line for line in sup.lines if any(k in line for k in keep)))
    record.add(f"/status after: {summary(after)}; restarts {after['ranks'][0]['restarts']}")
    record.add(f"NVML at the end: {json.dumps(end)}; then SIGTERM -> exit status {code}")
    holders = [pid for procs in end.values() for pid, _ in procs]
    assert holders == [new], f"the GPU should end with the new engine alone: {holders}"
    assert code == 0


async def scenario_stalled_evidence(record: Record, out: Path) -> None:
    evidence = out.parent / "evidence"
    fake = (PY, "-m", "trio_dpsup.testing.fake_rank", "--port", "{port}", "--allocate", "1024")
    args = cli(
        1, "--progress-timeout", "2", "--progress-interval", "0.5",
        "--progress-busy-metric", "fake:requests_running", "--progress-metric",
        "fake:tokens_total", "--evidence-dir", str(evidence), command=fake,
    )  # fmt: skip
    record.add("## 7. A stalled rank on a GPU: its evidence before the kill")
    record.block(
        "python -m trio_dpsup " + shlex.join(args) + "\n"
        "curl -X POST localhost:PORT/fault/busy; curl -X POST localhost:PORT/fault/stall",
        "sh",
    )
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        status = await wait_status(sup, verdicts("ok"))
        port = status["ranks"][0]["port"]
        for fault in (Fault.busy_with(1), Fault.stall()):
            await inject_fault(port, fault)
        with trio.fail_after(60):
            code = await sup.wait()
    (folder,) = [p for run in evidence.iterdir() for p in run.iterdir()]
    record.add(f"Exit status {code}. The root-cause record:")
    start = next(i for i, line in enumerate(sup.lines) if "stopped after a failure" in line)
    record.block("\n".join(sup.lines[start : start + 4]))
    record.add(f"The evidence folder `{folder.name}`: {sorted(p.name for p in folder.iterdir())}")
    record.add("cause.txt:")
    record.block((folder / "cause.txt").read_text())
    stacks = (folder / "stacks.txt").read_text()
    record.add("stacks.txt (py-spy dump of the rank's process):")
    record.block(stacks)
    gpus = json.loads((folder / "status.json").read_text())["gpus"]
    record.add(f"status.json's GPU readings: {json.dumps(gpus)}")
    assert code == 1
    assert "engine_step_stalled_in_fake_rank" in stacks, "the stall is not in the stacks"


async def scenario_llama_server(record: Record, out: Path) -> None:
    from trio_dpsup.testing.llama_cpp import find_llama_server, vocab_file, write_tiny_model

    server = find_llama_server("90")
    assert server is not None, "build it: python -m trio_dpsup.testing.llama_cpp --cuda-arch 90"
    model = write_tiny_model(Path(tempfile.mkdtemp()) / "tiny.gguf", vocab=vocab_file(server))
    command = (str(server), "-m", str(model), "-ngl", "99", "-c", "65536", "--no-warmup")
    args = cli(
        1, "--preset", "llama-cpp", "--restart", "on-failure", "--restart-backoff-min", "0.1",
        "--restart-backoff-max", "0.2", command=command,
    )  # fmt: skip
    record.add("## 8. A real engine on the GPU: llama.cpp's llama-server, built with CUDA")
    version = await trio.run_process([str(server), "--version"], capture_stderr=True)
    record.add("llama-server (trio_dpsup.testing.llama_cpp, the llama-server target only):")
    record.block(version.stderr.decode())
    size = model.stat().st_size >> 20
    record.add(
        f"The model: {size} MiB of random F16 weights (2 layers, width 256), written at run "
        "time; `-c 65536` makes its KV cache plain to see."
    )
    record.block("python -m trio_dpsup " + shlex.join(args), "sh")
    async with open_cli_supervisor(args) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        status = await wait_status(sup, verdicts("ok"))
        port = status["ranks"][0]["port"]
        async with httpx.AsyncClient(timeout=60) as client:
            url = f"http://127.0.0.1:{port}/completion"
            answer = (await client.post(url, json={"prompt": "Hello", "n_predict": 16})).json()
        before = await trio.to_thread.run_sync(nvml_processes)
        (old,) = [pid for procs in before.values() for pid, _ in procs]
        record.add(f"Ready: {summary(status)}; a completion: {answer['tokens_predicted']} tokens, "
                   f"{answer['timings']['predicted_per_second']:.0f} tokens/s.")  # fmt: skip
        record.add(f"NVML while ready: {json.dumps(before)} (pid {old}: {proc_name(old)})")
        # The rank SIGKILLed: the old engine's memory is released before the new one's.
        timeline, new = await kill_rank_and_watch(sup, status, old)
        after = await wait_status(sup, restarted_once)
        holders = await trio.to_thread.run_sync(nvml_processes)
        record.add("NVML after the rank's SIGKILL, each time it changed (seconds after it):")
        record.block("\n".join(f"+{t:.3f} s: {procs}" for t, procs in timeline))
        record.add(f"/status after: {summary(after)}; NVML: {json.dumps(holders)}")
        assert [pid for procs in holders.values() for pid, _ in procs] == [new]
        # SIGTERM: a clean exit, and the GPU empty.
        stopped_at = trio.current_time()
        sup.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            code = await sup.wait()
        left = await trio.to_thread.run_sync(nvml_processes)
        record.add(f"SIGTERM -> exit status {code} in {trio.current_time() - stopped_at:.2f} s; "
                   f"NVML after: {json.dumps(left)}")  # fmt: skip
        assert code == 0
        assert not any(left.values())
    # The supervisor SIGKILLed: the guardian takes llama-server along.
    async with open_cli_supervisor(cli(1, "--preset", "llama-cpp", command=command)) as sup:
        with trio.fail_after(300):
            await sup.wait_ready()
        await wait_status(sup, verdicts("ok"))
        before = await trio.to_thread.run_sync(nvml_processes)
        left, released = await kill_and_wait_released(sup, before, pacing=0.005)
    record.add(f"The supervisor SIGKILLed: NVML before {json.dumps(before)}; "
               f"{released:.3f} s after the SIGKILL: {json.dumps(left)}")  # fmt: skip
    assert not any(left.values()), "llama-server's GPU memory outlived the supervisor"


async def main(out: Path, only: set[int] | None = None) -> None:
    record = Record()
    backend = open_pynvml()
    inventory = backend.inventory()
    backend.close()
    gpus = [g for g in inventory if not g.is_mig]
    smi = await trio.run_process(["nvidia-smi", "-L"], capture_stdout=True, check=False)
    record.add(f"# trio_dpsup on real GPUs, {datetime.date.today().isoformat()}")
    record.add()
    record.add(f"Machine: {platform.node()}, Linux {platform.release()}, Python "
               f"{platform.python_version()}, {len(gpus)} GPU(s).")  # fmt: skip
    record.block(smi.stdout.decode())
    record.add("Produced by `python -m bench.gpu_validation gpu-record.md` "
               "(bench/gpu_validation.py), every figure and line below from that run.")  # fmt: skip
    record.add()
    scenarios: dict[int, Callable[[], Awaitable[None]]] = {
        1: partial(scenario_placement, record, len(gpus)),
        2: partial(scenario_wrong_gpu, record),
        3: partial(scenario_sigkill, record),
        4: partial(scenario_leftovers, record),
        5: partial(_both_engines, record),
        6: partial(scenario_restart_after_sigkill, record),
        7: partial(scenario_stalled_evidence, record, out),
        8: partial(scenario_llama_server, record, out),
    }
    chosen = sorted(only or scenarios)
    for number in chosen:
        await scenarios[number]()
    record.add(f"Scenarios {', '.join(map(str, chosen))} held.")
    await trio.Path(out).write_text("\n".join(record.lines) + "\n")


async def _both_engines(record: Record) -> None:
    await scenario_renamed_engines(record)
    await scenario_renamed_engines(record, "--cgroups")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_validation")
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", help="comma list of scenario numbers (default: all)")
    options = parser.parse_args()
    picked = None if options.only is None else {int(n) for n in options.only.split(",")}
    trio.run(main, options.out, picked)
