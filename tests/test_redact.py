"""Secrets in the spellings a rank command really has, and what must stay readable."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_dpsup._output.redact import (  # the redaction unit itself, on purpose
    redact_argv,
    redact_text,
)

SECRET = "hunter2-s3cret"
TOKEN = "sk-proj-Ab12Cd34Ef56Gh78Ij90"


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["serve", "-k", SECRET], ["-k"]),  # a short option, declared secret
        (["serve", "--pass", SECRET], []),
        (["serve", "--credentials", SECRET], []),
        (["serve", "--authorization", f"Bearer {SECRET}"], []),
        (["curl", "-H", f"Authorization: Bearer {SECRET}"], []),
        (["curl", "-H", f"X-Api-Key: {SECRET}"], []),
        (["serve", "--model-url", f"http://user:{SECRET}@host:8080/m"], []),
        (["serve", "--hf-overrides", f'{{"api_key": "{SECRET}", "x": 1}}'], []),
        (["serve", "--api-key", "first", "--api-key", SECRET], []),  # repeated
        (["serve", "--api-key", "first", f"--api-key={SECRET}"], []),
        (["sh", "-c", f"exec vllm serve m --api-key {SECRET} --port 1"], []),
        (["sh", "-c", f"HF_TOKEN={SECRET} exec vllm serve m"], []),
        (["sh", "-c", f"vllm serve m --api-key='{SECRET}'"], []),
        (["serve", "--some-flag", TOKEN], []),  # a token's shape, under any name
        (["serve", "-k", TOKEN], []),  # a short option, by shape
        # A token that begins like a device name but is not one.
        (["serve", "--flag", "GPU-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56"], []),
        # Spellings that once slipped through (an attack on c84b649 found each).
        (["serve", "--api-keys", SECRET], []),
        (["serve", "--tokens", SECRET], []),
        (["serve", "--bearer", SECRET], []),
        (["serve", "--passphrase", SECRET], []),
        (["serve", "--api-key", f"-{SECRET}"], []),  # a value that begins with a dash
        (["curl", f"--header=X-Api-Key: {SECRET}"], []),
        (["curl", f"-HX-Api-Key: {SECRET}"], []),
        (["sh", "-c", f"curl -H 'X-Api-Key: {SECRET}' http://x"], []),
        (["serve", "--hf-overrides", f"{{'api_key': '{SECRET}'}}"], []),  # a Python literal
        (["serve", "--model-url", f"https://b.s3/m?X-Amz-Signature={SECRET}&x=1"], []),
        (["serve", "--model-url", f"https://blob/m?sv=1&sig={SECRET}"], []),
        (["serve", "--seed-key", "0123456789abcdef" * 4], []),  # a 64-digit hex key
        (
            [
                "serve",
                "--weights",
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            ],
            [],
        ),
    ],
)
def test_secrets_are_hidden(argv: list[str], extra: list[str]) -> None:
    shown = " ".join(redact_argv(argv, extra))
    assert SECRET not in shown, shown
    assert "Ab12Cd34" not in shown, shown
    assert "0123456789abcdef0123" not in shown, shown
    assert "9f86d081884c7d659a2f" not in shown, shown
    assert "***" in shown
    assert "first" not in shown


@pytest.mark.parametrize(
    "argv",
    [
        ["vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct", "--tokenizer", "t"],
        ["vllm", "serve", "m", "--max-num-batched-tokens", "8192", "--port", "8000"],
        ["vllm", "serve", "Qwen/Qwen2.5-72B-Instruct-AWQ", "--served-model-name", "qwen"],
        ["vllm", "serve", "m", "--revision", "3f2a9c0b8e7d6c5b4a39281706f5e4d3c2b1a090"],
        ["sh", "-c", "exec vllm serve m --port 8000 --host 0.0.0.0"],
        ["serve", "--url", "http://10.0.0.1:8000/v1"],
        ["serve", "--no-auth", "--port", "8000"],
        ["serve", "--hf-overrides", '{"max_tokens": 8, "rope_scaling": {"type": "yarn"}}'],
        # Device names, in the evidence's status.json and a GpuFailed's message (the GPU
        # record of 2026-12-03 showed them hidden): long and mixed, and no secret.
        ["serve", '"uuid": "GPU-2eaac1b0-7bba-de5c-d1a8-50573d40827d"'],
        ["serve", "GPU 0 (GPU-2eaac1b0-7bba-de5c-d1a8-50573d40827d) failed"],
        ["serve", "MIG-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"],
    ],
)
def test_what_is_no_secret_stays_readable(argv: list[str]) -> None:
    assert list(redact_argv(argv)) == argv


# -- held as properties: every spelling a program prints, any secret name, any case

#: Names of secrets, as programs spell them.
SECRET_NAMES = (
    "api_key", "apikey", "token", "hf_token", "access_token", "secret", "client_secret",
    "password", "passwd", "passphrase", "auth", "authorization", "credentials", "bearer",
    "signature", "pwd", "pass", "cookie", "private_key", "openai_api_key",
)  # fmt: skip
#: Names of ordinary settings, whose values must stay readable.
PLAIN_NAMES = (
    "max_tokens", "temperature", "model", "port", "host", "path", "device", "top_p", "seed",
    "served_model_name", "max_num_batched_tokens", "tokenizer", "gpu", "revision",
)  # fmt: skip
PLAIN_VALUES = (
    "16", "0.7", "meta-llama/Llama-3.1-8B-Instruct", "/models/llama-7b", "8000",
    "GPU-2eaac1b0-7bba-de5c-d1a8-50573d40827d", "Qwen/Qwen2.5-72B-Instruct-AWQ", "yarn",
)  # fmt: skip
#: `name = value` as programs print it: {k} the name, {v} the value.
SPELLINGS = (
    "{k}={v}", "{k} = {v}", "{k}: {v}", "{k}:{v}", '{k}="{v}"', "{k} = '{v}'",
    '"{k}": "{v}"', "'{k}': '{v}'", '{{"{k}": "{v}"}}', "{{'{k}': '{v}'}}",
    "{{b'{k}': b'{v}'}}", '{{"{k}": ["{v}"]}}', "{k}=['{v}']", "'{k}': ['{v}']",
    "Client({k} = '{v}')", "dict({k}={v!r})", "--{k} {v}", "--{k}={v}", "{{{k}: {v}}}",
    "https://x.example/m?{k}={v}&y=1", "-H '{k}: {v}'",
)  # fmt: skip
AROUND = st.tuples(
    st.sampled_from(["", "INFO ", "[rank 0] ", "config: ", "got "]),
    st.sampled_from(["", " and more", ",", ")", "\n"]),
)


def _spelled(name: str, case: str, dash: bool, encoded: bool) -> str:
    name = {"lower": name, "upper": name.upper(), "title": name.title()}[case]
    if dash:
        name = name.replace("_", "-")
    if encoded:
        name = name.replace("_", "%5F").replace("-", "%2D")
    return name


@settings(max_examples=1000, deadline=None)
@given(
    name=st.sampled_from(SECRET_NAMES),
    case=st.sampled_from(["lower", "upper", "title"]),
    dash=st.booleans(),
    encoded=st.booleans(),
    spelling=st.sampled_from(SPELLINGS),
    value=st.text(alphabet="abcdefghjkmnpqrstuvwxyz23456789", min_size=6, max_size=14),
    around=AROUND,
)
def test_any_secret_name_in_any_spelling_is_hidden(
    name: str,
    case: str,
    dash: bool,
    encoded: bool,
    spelling: str,
    value: str,
    around: tuple[str, str],
) -> None:
    secret = f"Zq{value}"  # distinctive, 8 characters or more
    # URL-encoded names are what a query string or a form body carries: `api%5Fkey=X`.
    form = spelling.startswith("{k}=") or "?" in spelling
    key = _spelled(name, case, dash, encoded and form)
    line = around[0] + spelling.format(k=key, v=secret) + around[1]
    shown = redact_text(line)
    assert secret not in shown, (line, shown)


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from(PLAIN_NAMES),
    case=st.sampled_from(["lower", "upper"]),
    spelling=st.sampled_from(SPELLINGS),
    value=st.sampled_from(PLAIN_VALUES),
    around=AROUND,
)
def test_ordinary_values_stay_readable(
    name: str, case: str, spelling: str, value: str, around: tuple[str, str]
) -> None:
    line = around[0] + spelling.format(k=_spelled(name, case, False, False), v=value) + around[1]
    assert redact_text(line) == line


@pytest.mark.parametrize(
    "line",
    [
        "'api_key': ['hunter2-S3cret']",
        "api_key=['hunter2-S3cret']",
        'API_KEY = "hunter2-S3cret"',
        "OpenAI(api_key = 'hunter2-S3cret')",
        "api%5Fkey=hunter2-S3cret",
        "{b'api_key': b'hunter2-S3cret'}",
        '{"password": ["hunter2-S3cret"]}',
        "{api_key: hunter2-S3cret}",
        "curl -u admin:hunter2-S3cret https://x",
        "mysql -phunter2-S3cret -h db",
    ],
)
def test_the_spellings_an_attack_found(line: str) -> None:
    # Each passed redaction on f2fe13b (the reliability issue, item 5).
    assert "hunter2-S3cret" not in redact_text(line)
