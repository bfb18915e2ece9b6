"""Presets: the server command as its users write it, and what each rank needs added.

``--preset vllm``, for ``vllm serve MODEL --data-parallel-size 16 ...`` (vLLM's external load
balancing: one server per data-parallel rank): each rank gets ``--host {host} --port {port}
--data-parallel-rank {rank}``.

``--preset sglang``, for ``python -m sglang.launch_server --model-path MODEL ...``: each rank
is a whole SGLang server, and gets ``--host {host} --port {port}``.

Options the supervisor owns are refused with the fix named; the devices per rank must match
the command's tensor x pipeline parallel size; for vLLM, start rank + ranks must fit in
``--data-parallel-size``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import ConfigError

__all__ = ["PROGRESS_METRICS", "Preset", "apply_preset", "check_preset_ranks", "check_progress"]


class Preset(enum.Enum):
    VLLM = "vllm"
    SGLANG = "sglang"


#: (busy gauge, progress counter) on each server's own /metrics, for the progress check.
PROGRESS_METRICS = {
    # vLLM's production metrics (docs.vllm.ai, "Production Metrics"; docs/design/metrics.md
    # of vllm-project/vllm): vllm:num_requests_running, a gauge of the requests running on
    # the GPU, and vllm:generation_tokens, a counter served as vllm:generation_tokens_total.
    Preset.VLLM: ("vllm:num_requests_running", "vllm:generation_tokens_total"),
    # SGLang's (docs.sglang.io, "Production Metrics"; python/sglang/srt/metrics/collector.py
    # of sgl-project/sglang): sglang:num_running_reqs, "The number of running requests.",
    # and the counter sglang:generation_tokens_total. Served only with --enable-metrics.
    Preset.SGLANG: ("sglang:num_running_reqs", "sglang:generation_tokens_total"),
}


def check_progress(preset: Preset, command: Sequence[str]) -> None:
    """The server must serve the metrics the progress check reads."""
    if preset is Preset.SGLANG and "--enable-metrics" not in command:
        raise ConfigError(
            "--preset sglang with --progress-timeout: SGLang serves /metrics only with "
            "--enable-metrics: add it to the command"
        )


@dataclass(frozen=True)
class _Rules:
    #: Added to the command, per rank.
    added: tuple[str, ...]
    #: Options the supervisor owns (each spelling), with the fix to name.
    owned: dict[str, str]
    #: Options whose product is the GPUs one server uses.
    parallel: tuple[tuple[str, ...], ...]
    #: The data-parallel size option, when the servers know it.
    dp_size: tuple[str, ...] = ()


_OWNED_PORT = "the supervisor gives rank i the port --base-port + i: drop it"
_OWNED_HOST = "use trio-dpsup --host: it is also where ranks are probed"

_RULES = {
    Preset.VLLM: _Rules(
        added=("--host", "{host}", "--port", "{port}", "--data-parallel-rank", "{rank}"),
        owned={
            "--port": _OWNED_PORT,
            "--host": _OWNED_HOST,
            "--data-parallel-rank": "the supervisor gives each rank its --data-parallel-rank",
            "-dpr": "the supervisor gives each rank its --data-parallel-rank",
            "--data-parallel-multi-port-external-lb": "the supervisor runs one server per rank "
            "itself: drop it",
            "--data-parallel-hybrid-lb": "the supervisor runs one server per rank: drop it",
        },
        parallel=(("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")),
        dp_size=("--data-parallel-size", "-dp"),
    ),
    Preset.SGLANG: _Rules(
        added=("--host", "{host}", "--port", "{port}"),
        owned={
            "--port": _OWNED_PORT,
            "--host": _OWNED_HOST,
            "--base-gpu-id": "the supervisor sets CUDA_VISIBLE_DEVICES per rank: drop it",
        },
        parallel=(("--tp-size", "--tp"), ("--pp-size", "--pp")),
    ),
}
#: Local data-parallel options: more than 1 means one server spanning several ranks.
_DP_LOCAL = {
    Preset.VLLM: ("--data-parallel-size-local", "-dpl"),
    Preset.SGLANG: ("--dp-size", "--dp"),
}


def apply_preset(preset: Preset, command: Sequence[str], gpus_per_rank: int) -> tuple[str, ...]:
    """`command` with what each rank needs added. Raises ConfigError naming the fix."""
    rules = _RULES[preset]
    name = preset.value
    for arg in command[1:]:
        option = arg.split("=", 1)[0]
        if option in rules.owned:
            raise ConfigError(f"--preset {name}: {option} in the command: {rules.owned[option]}")
    local = _int_option(command, _DP_LOCAL[preset], name)
    if local is not None and local[1] > 1:
        raise ConfigError(
            f"--preset {name}: {local[0]} {local[1]} makes one server span several ranks; "
            "the supervisor runs one server per rank: drop it"
        )
    per_server = 1
    for spellings in rules.parallel:
        found = _int_option(command, spellings, name)
        per_server *= 1 if found is None else found[1]
    if gpus_per_rank and per_server != gpus_per_rank:
        raise ConfigError(
            f"--preset {name}: each server uses {per_server} GPU(s) (tensor x pipeline "
            f"parallel size) but --gpus-per-rank is {gpus_per_rank}: pass --gpus-per-rank "
            f"{per_server}"
        )
    return (*command, *rules.added)


def check_preset_ranks(preset: Preset, command: Sequence[str], start_rank: int, ranks: int) -> None:
    """For vLLM: the ranks must fit in ``--data-parallel-size``. Raises ConfigError."""
    spellings = _RULES[preset].dp_size
    if not spellings:
        return
    found = _int_option(command, spellings, preset.value)
    size = 1 if found is None else found[1]
    if start_rank + ranks > size:
        raise ConfigError(
            f"--preset {preset.value}: ranks {start_rank}-{start_rank + ranks - 1} do not fit "
            f"in --data-parallel-size {size}: pass --data-parallel-size "
            f"{start_rank + ranks} or more in the command, or fewer --ranks"
        )


def _int_option(
    command: Sequence[str], spellings: Sequence[str], preset: str
) -> tuple[str, int] | None:
    """An integer option (``--x 4`` or ``--x=4``) as spelled and its value; None if absent."""
    for index, arg in enumerate(command):
        option, eq, value = arg.partition("=")
        if option not in spellings:
            continue
        if not eq:
            value = command[index + 1] if index + 1 < len(command) else ""
        try:
            return option, int(value)
        except ValueError:
            raise ConfigError(
                f"--preset {preset}: {option} needs a whole number, not {value!r}"
            ) from None
    return None
