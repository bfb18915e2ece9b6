"""The canary's request: a one-token generation, per preset or as given.

A canary proves that a rank still generates, where /health only proves that its HTTP
server answers. Each preset knows a request its server takes, looked up in the server's own
sources:

* llama.cpp's llama-server: ``POST /completion`` with ``n_predict: 1`` (tools/server/README.md
  of ggml-org/llama.cpp, "POST /completion": ``n_predict``, the tokens to predict).
* vLLM: ``POST /v1/completions`` with ``max_tokens: 1`` and the served model name, which is
  the first ``--served-model-name`` when given, else the model argument (``vllm serve
  MODEL`` or ``--model MODEL``; vllm/engine/arg_utils.py: "If multiple names are provided,
  the server will respond to any of the provided names. The model name in the model field
  of a response will be the first name in this list. If not specified, the model name will
  be the same as the `--model` argument."). Any other name is a 404.
* SGLang: ``GET /health_generate`` (python/sglang/srt/entrypoints/http_server.py of
  sgl-project/sglang: "Check the health of the inference server by sending a special
  request to generate one token"; ignored, and answered at once, while the server runs
  something).

Models that do not generate get no canary by default: vLLM's ``--runner pooling`` (and the
older ``--task embed``/``embedding``/``classify``/``score``/``reward``; docs.vllm.ai,
"Pooling Models"), llama-server's ``--embedding``/``--embeddings`` (its --help, build
11434: "restrict to only support embedding use case") and ``--rerank``/``--reranking``,
SGLang's ``--is-embedding``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import ConfigError
from .presets import VLLM_SHORT, Preset

__all__ = [
    "CANARY_METHODS",
    "CanaryRequest",
    "not_generating",
    "parse_canary_request",
    "preset_canary",
]

#: The methods a canary may use: it reads, or it generates; nothing else.
CANARY_METHODS = ("GET", "POST")
#: What a canary asks the model to continue.
CANARY_PROMPT = "Hello"

#: The options that make each server serve a model that does not generate, with the values
#: that do so (None: the flag alone).
_NOT_GENERATING: dict[Preset, dict[str, tuple[str, ...] | None]] = {
    Preset.VLLM: {
        "--runner": ("pooling",),
        "--task": ("embed", "embedding", "classify", "score", "reward"),
    },
    Preset.LLAMA_CPP: {
        "--embedding": None,
        "--embeddings": None,
        "--rerank": None,
        "--reranking": None,
    },
    Preset.SGLANG: {"--is-embedding": None},
}


@dataclass(frozen=True)
class CanaryRequest:
    """One canary: `method` `path`, with `body` (JSON) when it is a POST."""

    method: str
    path: str
    body: bytes | None = None

    def describe(self) -> str:
        return f"{self.method} {self.path}"


def parse_canary_request(option: str, parts: Sequence[str]) -> CanaryRequest:
    """``--canary-request METHOD PATH JSON``, checked: raises ConfigError naming the fix."""
    if len(parts) != 3:
        raise ConfigError(
            f"{option} takes three values, METHOD PATH JSON, e.g. "
            f'{option} POST /v1/completions \'{{"prompt": "Hi", "max_tokens": 1}}\''
        )
    method, path, text = parts
    if method.upper() not in CANARY_METHODS:
        raise ConfigError(f"{option}: method {method!r}: give GET or POST")
    if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
        raise ConfigError(f"{option}: path {path!r} must start with '/', e.g. /v1/completions")
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"{option}: the JSON body does not parse ({exc}): give one JSON value, quoted whole"
        ) from None
    data = json.dumps(body).encode()
    return CanaryRequest(method.upper(), path, None if method.upper() == "GET" else data)


def _options(preset: Preset, command: Sequence[str]) -> dict[str, str | None]:
    """The command's options (long form for vLLM) and the value after each, if any."""
    found: dict[str, str | None] = {}
    for index, arg in enumerate(command[1:], start=1):
        if not arg.startswith("-"):
            continue
        option, eq, value = arg.partition("=")
        if preset is Preset.VLLM:
            option = VLLM_SHORT.get(option, option)
            if option.startswith("--"):
                option = "--" + option[2:].replace("_", "-")
        if not eq:
            following = command[index + 1] if index + 1 < len(command) else None
            value = following if following is not None and not following.startswith("-") else ""
        found.setdefault(option, value or None)
    return found


def not_generating(preset: Preset, command: Sequence[str]) -> str | None:
    """The option that makes the command's model one that does not generate, as written;
    None for a generating model."""
    options = _options(preset, command)
    for option, values in _NOT_GENERATING[preset].items():
        if option not in options:
            continue
        value = options[option]
        if values is None:
            return option
        if value is not None and value in values:
            return f"{option} {value}"
    return None


def _vllm_model(command: Sequence[str]) -> str | None:
    """The name vLLM serves the model as (see the module's docstring)."""
    options = _options(Preset.VLLM, command)
    if options.get("--served-model-name"):
        return options["--served-model-name"]
    if options.get("--model"):
        return options["--model"]
    # ``vllm serve MODEL``: the first word after "serve" that is not an option's value.
    words = list(command)
    if "serve" in words:
        after = words[words.index("serve") + 1 :]
        if after and not after[0].startswith("-"):
            return after[0]
    return None


def preset_canary(preset: Preset, command: Sequence[str]) -> CanaryRequest | None:
    """The preset's canary for `command`; None when the command names no model to ask."""
    if preset is Preset.LLAMA_CPP:
        body = {"prompt": CANARY_PROMPT, "n_predict": 1}
        return CanaryRequest("POST", "/completion", json.dumps(body).encode())
    if preset is Preset.SGLANG:
        return CanaryRequest("GET", "/health_generate")
    model = _vllm_model(command)
    if model is None:
        return None
    body = {"model": model, "prompt": CANARY_PROMPT, "max_tokens": 1}
    return CanaryRequest("POST", "/v1/completions", json.dumps(body).encode())
